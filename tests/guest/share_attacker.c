/* Guest root playing the attacker against the pod's virtio-fs share.
 *
 * /init of the attacker test image: forks the attack, then execs the real
 * agent (/podbox-agent), which stays PID 1. The attack runs as root in the
 * guest's initial namespaces, as code that owns the guest kernel would: it
 * waits for a container whose volumes hold `precious` (rw) and
 * `chroot_escape` (ro), tries to change the share's tree around the mounts
 * and to write the ro volume, writes one `key: result` line per attempt
 * ("ok" or the errno text) to <rw volume>/attack-results, then floods the
 * serial console for FLOOD_SECONDS and writes <rw volume>/flood-done. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define SHARE "/run/podbox/shared"
#define FLOOD_SECONDS 60

static char container[512], ro[768], rw[768];

static int exists(const char *dir, const char *name) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* Finds a container of the share with both volumes; 1 when found. The
 * guest caches the share's directory listings (virtiofsd --cache always),
 * so it drops its caches first, as any guest root may. */
static int find_target(void) {
    int caches = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (caches >= 0) {
        if (write(caches, "3", 1) < 0) perror("share-attacker: drop_caches");
        close(caches);
    }
    DIR *share = opendir(SHARE);
    if (!share) return 0;
    struct dirent *c;
    int found = 0;
    while (!found && (c = readdir(share))) {
        if (c->d_name[0] == '.') continue;
        char mounts[768];
        snprintf(mounts, sizeof(mounts), SHARE "/%s/mounts", c->d_name);
        DIR *m = opendir(mounts);
        if (!m) continue;
        ro[0] = rw[0] = 0;
        struct dirent *v;
        while ((v = readdir(m))) {
            char path[1024];
            if (v->d_name[0] == '.') continue;
            snprintf(path, sizeof(path), "%s/%s", mounts, v->d_name);
            if (exists(path, "chroot_escape")) snprintf(ro, sizeof(ro), "%s", path);
            if (exists(path, "precious")) snprintf(rw, sizeof(rw), "%s", path);
        }
        closedir(m);
        if (ro[0] && rw[0]) {
            snprintf(container, sizeof(container), SHARE "/%s", c->d_name);
            found = 1;
        }
    }
    closedir(share);
    return found;
}

static FILE *results;

static void report(const char *key, int rc) {
    fprintf(results, "%s: %s\n", key, rc == 0 ? "ok" : strerror(errno));
}

static void attack(void) {
    char a[1024], b[1024];
    snprintf(a, sizeof(a), "%s/evil", SHARE);
    report("create-in-share-root", mkdir(a, 0755));
    snprintf(a, sizeof(a), "%s/evil", container);
    report("plant-symlink", symlink("/", a));
    snprintf(a, sizeof(a), "%s/mounts", container);
    snprintf(b, sizeof(b), "%s/gone", container);
    report("swap-mounts", rename(a, b));
    report("remove-mounts", rmdir(a));
    snprintf(a, sizeof(a), "%s/rootfs", container);
    snprintf(b, sizeof(b), "%s/rootfs.old", container);
    report("swap-rootfs", rename(a, b));
    snprintf(b, sizeof(b), "%s/mounts/\377\376", container);
    report("rename-volume", rename(rw, b));
    report("remove-volume-point", rmdir(ro));
    snprintf(a, sizeof(a), "%s/new", ro);
    int fd = open(a, O_WRONLY | O_CREAT, 0644);
    report("ro-via-share", fd < 0 ? -1 : 0);
    snprintf(a, sizeof(a), "%s/chroot_escape", ro);
    report("ro-unlink", unlink(a));
    snprintf(a, sizeof(a), "%s/rootfs/new", container);
    fd = open(a, O_WRONLY | O_CREAT, 0644);
    report("rootfs-write-via-share", fd < 0 ? -1 : 0);
    snprintf(a, sizeof(a), "%s/node", rw);
    report("mknod-via-share", mknod(a, S_IFCHR | 0666, makedev(1, 3)));
    /* 2000 tries to swap the tree for a symlink (each a round trip to virtiofsd). */
    int swapped = 0;
    snprintf(a, sizeof(a), "%s/mounts", container);
    snprintf(b, sizeof(b), "%s/mounts.aside", container);
    for (int i = 0; i < 1000; i++) {
        if (rename(a, b) == 0) swapped++;
        if (symlink("/", a) == 0) swapped++;
    }
    fprintf(results, "swaps: %d\n", swapped);
}

static void flood(void) {
    static char line[4096];
    memset(line, 'x', sizeof(line) - 1);
    line[sizeof(line) - 1] = '\n';
    time_t start = time(NULL);
    long long total = 0;
    while (time(NULL) - start < FLOOD_SECONDS) {
        ssize_t n = write(STDOUT_FILENO, line, sizeof(line));
        if (n > 0) total += n;
    }
    char path[1024];
    snprintf(path, sizeof(path), "%s/flood-done", rw);
    FILE *done = fopen(path, "w");
    if (done) {
        fprintf(done, "%lld bytes in %d s\n", total, FLOOD_SECONDS);
        fclose(done);
    }
}

static void run(void) {
    setpriority(PRIO_PROCESS, 0, 19);
    fprintf(stderr, "share-attacker: waiting for a container with both volumes\n");
    for (int i = 0; i < 1800 && !find_target(); i++) sleep(1);
    if (!rw[0]) {
        fprintf(stderr, "share-attacker: no target found\n");
        return;
    }
    fprintf(stderr, "share-attacker: attacking %s (ro %s, rw %s)\n", container, ro, rw);
    char path[1024];
    snprintf(path, sizeof(path), "%s/attack-results", rw);
    results = fopen(path, "w");
    if (!results) {
        fprintf(stderr, "share-attacker: %s: %s\n", path, strerror(errno));
        return;
    }
    attack();
    fclose(results);
    fprintf(stderr, "share-attacker: flooding the console for %d s\n", FLOOD_SECONDS);
    flood();
}

int main(void) {
    if (fork() == 0) {
        run();
        _exit(0);
    }
    char *argv[] = {"/podbox-agent", NULL};
    execv(argv[0], argv);
    perror("share-attacker: exec /podbox-agent");
    return 1;
}
