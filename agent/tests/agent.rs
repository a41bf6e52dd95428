//! Integration tests: the real podbox-agent binary on a unix socket, real
//! namespaces, cgroups and a busybox rootfs. They need root and say so
//! loudly when skipped.

mod common;

use std::time::Duration;

use common::*;
use podbox_protocol::agent::*;
use podbox_protocol::health::CheckRequest;
use serde_json::json;

fn ns_of(pid: i32, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap_or_else(|e| panic!("read ns {ns} of {pid}: {e}"))
        .display()
        .to_string()
}

/// After failed creates of `ids` in pod1: no cgroup, container, mount or
/// process of theirs remains.
fn assert_nothing_left(a: &Agent, ids: &[&str]) {
    for id in ids {
        assert!(
            !cgroup_dir(&format!("{}/pod1/{id}", a.cgroup_parent)).exists(),
            "cgroup of {id} left behind"
        );
        let r = a.client.list_processes(
            ctx(),
            &ListProcessesRequest {
                container_id: id.to_string(),
                ..Default::default()
            },
        );
        assert!(r.is_err(), "{id} must not exist");
    }
    assert_eq!(
        a.host_mounts_under_dir(),
        Vec::<String>::new(),
        "no mounts leak to the host"
    );
    let pod_cg = cgroup_dir(&format!("{}/pod1", a.cgroup_parent));
    let procs = std::fs::read_to_string(pod_cg.join("cgroup.procs")).unwrap_or_default();
    assert_eq!(procs.trim(), "", "no process left in the pod cgroup");
}

#[test]
fn two_containers_share_network_but_not_mounts_or_pids() {
    let Some(a) = pod_for("two_containers_share_network_but_not_mounts_or_pids", false) else {
        return;
    };
    let long = [
        "sh",
        "-c",
        "echo mine > /tmp/only-here; echo pid=$$; hostname; sleep 1000",
    ];
    a.run("c1", &spec(&long));
    a.run("c2", &spec(&["sleep", "1000"]));
    let (p1, p2) = (a.pids("c1"), a.pids("c2"));
    assert_eq!(p2.len(), 1, "c2 runs one process: {p2:?}");
    let (p1, p2) = (p1[0], p2[0]);
    assert_eq!(
        ns_of(p1, "net"),
        ns_of(p2, "net"),
        "network namespace is shared in the pod"
    );
    assert_eq!(
        ns_of(p1, "ipc"),
        ns_of(p2, "ipc"),
        "ipc namespace is shared in the pod"
    );
    assert_eq!(
        ns_of(p1, "uts"),
        ns_of(p2, "uts"),
        "uts namespace is shared in the pod"
    );
    assert_ne!(
        ns_of(p1, "mnt"),
        ns_of(p2, "mnt"),
        "each container has its own mounts"
    );
    assert_ne!(
        ns_of(p1, "pid"),
        ns_of(p2, "pid"),
        "each container has its own pids"
    );
    assert_ne!(ns_of(p1, "mnt"), ns_of(std::process::id() as i32, "mnt"));

    // Inside: c1 is PID 1 of its namespace and sees the pod hostname; c2
    // does not see c1's /tmp file nor its processes.
    a.exec(
        "c2",
        "look",
        &[
            "sh",
            "-c",
            "ls /tmp; tr '\\0' ' ' < /proc/1/cmdline; echo; ps -o args; hostname",
        ],
    );
    assert_eq!(a.wait("c2", "look"), 0);
    let out = a.stdout("c2", "look");
    assert!(!out.contains("only-here"), "c2 sees c1's /tmp: {out}");
    assert!(
        out.starts_with("sleep 1000 \n"),
        "c2's PID 1 is its own sleep: {out}"
    );
    assert!(!out.contains("echo mine"), "c2 sees c1's processes: {out}");
    assert!(out.ends_with("podhost\n"), "pod hostname: {out}");
    a.exec("c1", "cat", &["cat", "/tmp/only-here"]);
    assert_eq!(a.stdout("c1", "cat"), "mine\n");
    assert_eq!(a.wait("c1", "cat"), 0);

    let rm = |id: &str| {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        a.client
            .remove_container(ctx(), &req)
            .expect("RemoveContainer");
    };
    // c1's shell is PID 1 of its own namespace and has the pod hostname.
    let mut early = Vec::new();
    while !early.ends_with(b"podhost\n") {
        let r = ReadStreamRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        let d = a.client.read_stdout(ctx(), &r).expect("ReadStdout").data;
        assert!(!d.is_empty(), "c1 stdout ended early: {early:?}");
        early.extend(d);
    }
    assert_eq!(String::from_utf8_lossy(&early), "pid=1\npodhost\n");
    rm("c1");
    rm("c2");
    assert!(!cgroup_dir(&format!("{}/pod1/c1", a.cgroup_parent)).exists());
    let err = a.client.list_processes(
        ctx(),
        &ListProcessesRequest {
            container_id: "c1".into(),
            ..Default::default()
        },
    );
    assert!(err.is_err(), "removed container is gone");
}

#[test]
fn shared_pid_namespace_when_asked() {
    let Some(a) = pod_for("shared_pid_namespace_when_asked", true) else {
        return;
    };
    a.run("c1", &spec(&["sleep", "1000"]));
    a.run("c2", &spec(&["sleep", "1001"]));
    let (p1, p2) = (a.pids("c1")[0], a.pids("c2")[0]);
    assert_eq!(ns_of(p1, "pid"), ns_of(p2, "pid"));
    a.exec(
        "c2",
        "ps",
        &["sh", "-c", "ps -o args | grep -c '^sleep 100[01]'"],
    );
    assert_eq!(
        a.stdout("c2", "ps"),
        "2\n",
        "c2 sees both sleeps in the shared pid namespace"
    );
}

#[test]
fn stdin_to_stdout_round_trip_exec_and_exit_codes() {
    let Some(a) = pod_for("stdin_to_stdout_round_trip_exec_and_exit_codes", false) else {
        return;
    };
    a.run("cat", &spec(&["cat"]));
    let w = WriteStreamRequest {
        container_id: "cat".into(),
        data: b"hello podbox\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.client.write_stdin(ctx(), &w).expect("WriteStdin").len, 13);
    let c = CloseStdinRequest {
        container_id: "cat".into(),
        ..Default::default()
    };
    a.client.close_stdin(ctx(), &c).expect("CloseStdin");
    assert_eq!(a.stdout("cat", ""), "hello podbox\n");
    assert_eq!(a.wait("cat", ""), 0);
    assert!(
        a.client.write_stdin(ctx(), &w).is_err(),
        "stdin stays closed"
    );

    a.run("shell", &spec(&["sleep", "1000"]));
    a.exec(
        "shell",
        "e1",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(a.wait("shell", "e1"), 3);
    // Output written right before exit is still there after WaitProcess.
    assert_eq!(a.stdout("shell", "e1"), "out\n");
    assert_eq!(a.stderr("shell", "e1"), "err\n");

    a.run("exit7", &spec(&["sh", "-c", "exit 7"]));
    assert_eq!(a.wait("exit7", ""), 7);

    // A lot of output must arrive complete and in order.
    a.run("big", &spec(&["sh", "-c", "seq 1 20000"]));
    let out = a.stdout("big", "");
    assert_eq!(out.lines().count(), 20000);
    assert_eq!(out.lines().last(), Some("20000"));
    assert_eq!(a.wait("big", ""), 0);
}

#[test]
fn signals_reach_processes() {
    let Some(a) = pod_for("signals_reach_processes", false) else {
        return;
    };
    // As PID 1 of its namespace the shell only gets signals it handles.
    a.run(
        "trap",
        &spec(&[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while true; do sleep 0.05; done",
        ]),
    );
    let r = ReadStreamRequest {
        container_id: "trap".into(),
        ..Default::default()
    };
    let first = a.client.read_stdout(ctx(), &r).expect("read").data;
    assert_eq!(first, b"ready\n");
    a.signal("trap", "", 15);
    assert_eq!(a.wait("trap", ""), 42);
    assert_eq!(a.stdout("trap", ""), "got TERM\n");

    a.run("victim", &spec(&["sleep", "1000"]));
    a.exec("victim", "sleeper", &["sleep", "1000"]);
    a.signal("victim", "sleeper", 15);
    assert_eq!(
        a.wait("victim", "sleeper"),
        128 + 15,
        "exec'd sleep dies of SIGTERM"
    );
    // Dispositions as under runc: the agent (Rust ignores SIGPIPE) passes
    // on no ignored or blocked signal 1-31, to a container or an exec'd
    // process (32 and 33 are glibc's own; a host test inherits what the
    // harness set for them).
    let masks = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"];
    let standard = |status: &str, field: &str| -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(field));
        let hex = line
            .unwrap_or_else(|| panic!("no {field} in {status:?}"))
            .trim();
        u64::from_str_radix(hex, 16).expect("a hex mask") & 0x7fff_ffff
    };
    a.run("sigs", &spec(&masks));
    assert_eq!(a.wait("sigs", ""), 0);
    a.exec("victim", "sigs", &masks);
    assert_eq!(a.wait("victim", "sigs"), 0);
    // Nor a descriptor of the agent's (the harness gives it one without
    // O_CLOEXEC): stdio, and the one `ls` opens to list them.
    a.run("fds", &spec(&["ls", "/proc/self/fd"]));
    assert_eq!(a.wait("fds", ""), 0);
    a.exec("victim", "fds", &["ls", "/proc/self/fd"]);
    assert_eq!(a.wait("victim", "fds"), 0);
    assert_eq!(a.stdout("fds", ""), "0\n1\n2\n3\n", "container init");
    assert_eq!(a.stdout("victim", "fds"), "0\n1\n2\n3\n", "exec'd process");
    for (who, status) in [
        ("container init", a.stdout("sigs", "")),
        ("exec'd process", a.stdout("victim", "sigs")),
    ] {
        assert_eq!(standard(&status, "SigIgn:"), 0, "{who}: {status}");
        assert_eq!(standard(&status, "SigBlk:"), 0, "{who}: {status}");
    }
    a.signal("victim", "", 9);
    assert_eq!(a.wait("victim", ""), 128 + 9);

    let bad = SignalProcessRequest {
        container_id: "victim".into(),
        signal: 999,
        ..Default::default()
    };
    let e = a
        .client
        .signal_process(ctx(), &bad)
        .expect_err("bogus signal");
    assert!(format!("{e:?}").contains("not a signal"), "{e:?}");
}

#[test]
fn memory_limit_is_enforced_and_oom_reported() {
    let Some(a) = pod_for("memory_limit_is_enforced_and_oom_reported", false) else {
        return;
    };
    let mut s = spec(&["sh", "-c", "tail /dev/zero"]);
    s["linux"]["resources"]["memory"] = json!({"limit": 32 * 1024 * 1024});
    a.run("hog", &s);
    assert_eq!(
        a.wait("hog", ""),
        128 + 9,
        "the OOM killer SIGKILLs the hog"
    );
    let ev = a
        .client
        .get_oom_event(
            ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64),
            &GetOOMEventRequest::new(),
        )
        .expect("GetOOMEvent");
    assert_eq!(ev.container_id, "hog");
    let st = a
        .client
        .stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: "hog".into(),
                ..Default::default()
            },
        )
        .expect("StatsContainer");
    assert_eq!(st.memory_limit, 32 * 1024 * 1024);
    assert!(st.oom_kills >= 1);
    assert_eq!(st.pids_limit, 100);
}

#[test]
fn terminal_container() {
    let Some(a) = pod_for("terminal_container", false) else {
        return;
    };
    let mut s = spec(&[
        "sh",
        "-c",
        "read line; test -t 0 && echo is-a-tty; stty size; echo got $line",
    ]);
    s["process"]["terminal"] = json!(true);
    a.run("tty", &s);
    let rs = TtyWinResizeRequest {
        container_id: "tty".into(),
        row: 40,
        column: 100,
        ..Default::default()
    };
    a.client.tty_win_resize(ctx(), &rs).expect("TtyWinResize");
    let w = WriteStreamRequest {
        container_id: "tty".into(),
        data: b"typed\n".to_vec(),
        ..Default::default()
    };
    a.client.write_stdin(ctx(), &w).expect("WriteStdin");
    let out = a.stdout("tty", "");
    assert_eq!(a.wait("tty", ""), 0, "output: {out}");
    assert!(out.contains("is-a-tty"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
    // The terminal echoes input and uses CRLF line ends.
    assert!(out.contains("got typed\r\n"), "{out:?}");
    assert_eq!(a.stderr("tty", ""), "", "a terminal has no separate stderr");
}

#[test]
fn bad_input_is_rejected_with_clear_errors_and_leaves_nothing() {
    let Some(a) = agent_for("bad_input_is_rejected_with_clear_errors_and_leaves_nothing") else {
        return;
    };
    let msg = |r: ttrpc::Result<Empty>| match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    };
    let (code, m) = msg(a.create("early", &spec(&["true"])));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(m.contains("CreateSandbox"), "{m}");
    a.create_sandbox(false);

    let req = CreateContainerRequest {
        container_id: "junk".into(),
        oci_spec_json: b"{not json".to_vec(),
        ..Default::default()
    };
    let (code, m) = msg(a.client.create_container(ctx(), &req));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(m.contains("OCI spec is not valid JSON"), "{m}");

    let mut s = spec(&["true"]);
    s.as_object_mut().unwrap().remove("process");
    let (code, m) = msg(a.create("noproc", &s));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(m.contains("no process"), "{m}");

    let (code, m) = msg(a.create("../escape", &spec(&["true"])));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(m.contains("container id"), "{m}");

    // Valid JSON that fails inside the container setup, after namespaces,
    // cgroup and some mounts exist: all of it must be undone.
    let mut s = spec(&["true"]);
    s["mounts"].as_array_mut().unwrap().push(json!(
        {"destination": "/data", "type": "bind", "source": "/nonexistent/podbox", "options": ["rbind"]}
    ));
    let (code, m) = msg(a.create("badmount", &s));
    assert_eq!(code, ttrpc::Code::INTERNAL);
    assert!(m.contains("/nonexistent/podbox"), "{m}");

    let (_, m) = msg(a.create("noexe", &spec(&["/bin/does-not-exist"])));
    assert!(m.contains("does-not-exist"), "{m}");
    let (_, m) = msg(a.create("noexe2", &spec(&["nosuchprogram"])));
    assert!(m.contains("not found in PATH"), "{m}");

    assert_nothing_left(&a, &["badmount", "noexe", "noexe2"]);

    // Unknown ids and wrong states.
    let w = WaitProcessRequest {
        container_id: "ghost".into(),
        ..Default::default()
    };
    let e = a
        .client
        .wait_process(ctx(), &w)
        .expect_err("unknown container");
    assert!(format!("{e:?}").contains("not found"), "{e:?}");
    let ex = ExecProcessRequest {
        container_id: "ghost".into(),
        exec_id: "x".into(),
        process_json: b"[]".to_vec(),
        ..Default::default()
    };
    assert!(a.client.exec_process(ctx(), &ex).is_err());
    let up = UpdateContainerRequest {
        container_id: "ghost".into(),
        resources_json: b"{}".to_vec(),
        ..Default::default()
    };
    assert!(a.client.update_container(ctx(), &up).is_err());

    // The agent survived all of it.
    let h = a
        .health
        .check(ctx(), &CheckRequest::new())
        .expect("health check");
    assert_eq!(h.status.value(), 1);
}

#[test]
fn seccomp_profile_from_the_spec_is_enforced() {
    let Some(a) = pod_for("seccomp_profile_from_the_spec_is_enforced", false) else {
        return;
    };
    let deny_mkdir = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            // Profiles list syscalls of other kernels: skipped, not an error.
            {"names": ["no_such_syscall_on_any_kernel"], "action": "SCMP_ACT_KILL"}
        ]
    });
    let mut s = spec(&[
        "sh",
        "-c",
        "echo ok; mkdir /tmp/x; echo rc=$?; touch /tmp/file && echo touched; sleep 1000",
    ]);
    s["linux"]["seccomp"] = deny_mkdir.clone();
    a.run("sc", &s);
    let w = std::time::Instant::now();
    let mut out = String::new();
    while !out.contains("touched") && w.elapsed() < Duration::from_secs(20) {
        let r = ReadStreamRequest {
            container_id: "sc".into(),
            len: 4096,
            ..Default::default()
        };
        let d = a.client.read_stdout(ctx(), &r).expect("ReadStdout");
        if d.data.is_empty() {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&d.data));
    }
    assert!(
        out.starts_with("ok\n") && out.contains("rc=1\ntouched"),
        "stdout: {out:?}"
    );
    // Exec'd processes get the container's filter too.
    a.exec("sc", "e1", &["mkdir", "/tmp/y"]);
    assert_eq!(a.wait("sc", "e1"), 1);
    assert!(
        a.stderr("sc", "e1").contains("Operation not permitted"),
        "{}",
        a.stderr("sc", "e1")
    );

    // No CAP_SYS_ADMIN and noNewPrivileges false: the agent must set
    // no_new_privs itself or the kernel refuses the filter.
    let mut s = spec(&[
        "sh",
        "-c",
        "mkdir /tmp/x; grep NoNewPrivs /proc/self/status",
    ]);
    s["process"]["noNewPrivileges"] = json!(false);
    s["linux"]["seccomp"] = deny_mkdir;
    a.run("nnp", &s);
    assert_eq!(a.wait("nnp", ""), 0);
    let err = a.stderr("nnp", "");
    assert!(err.contains("Operation not permitted"), "stderr: {err:?}");
    assert!(a.stdout("nnp", "").contains("NoNewPrivs:\t1"));

    // No errnoRet: EPERM, as runc.
    let mut s = spec(&["sh", "-c", "mkdir /tmp/x"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    });
    a.run("eperm", &s);
    assert_eq!(a.wait("eperm", ""), 1);
    assert!(a.stderr("eperm", "").contains("Operation not permitted"));
}

#[test]
fn malformed_seccomp_profiles_are_rejected_and_leave_nothing() {
    let Some(a) = pod_for(
        "malformed_seccomp_profiles_are_rejected_and_leave_nothing",
        false,
    ) else {
        return;
    };
    let msg = |r: ttrpc::Result<Empty>| match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    };
    let cases = [
        (
            "badaction",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_BOGUS"}]}),
            "SCMP_ACT_BOGUS",
        ),
        (
            "baddefault",
            json!({"defaultAction": "SCMP_ACT_NOPE"}),
            "SCMP_ACT_NOPE",
        ),
        (
            "badop",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
            "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_SOMETIMES"}]}]}),
            "SCMP_CMP_SOMETIMES",
        ),
        (
            "notify",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "SCMP_ACT_NOTIFY",
        ),
        (
            "badarch",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_S390X"]}),
            "SCMP_ARCH_S390X",
        ),
        (
            "badindex",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
            "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}),
            "argument index 6",
        ),
    ];
    for (id, profile, want) in &cases {
        let mut s = spec(&["true"]);
        s["linux"]["seccomp"] = profile.clone();
        let (code, m) = msg(a.create(id, &s));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{id}: {m}");
        assert!(m.contains(want), "{id}: {m}");
    }
    assert_nothing_left(&a, &cases.iter().map(|c| c.0).collect::<Vec<_>>());
    // The id is free again: a valid profile under the same name works.
    let mut s = spec(&["true"]);
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
    a.run("badaction", &s);
    assert_eq!(a.wait("badaction", ""), 0);
}

#[test]
fn destroy_sandbox_leaves_no_mounts_cgroups_or_processes() {
    let Some(mut a) = pod_for(
        "destroy_sandbox_leaves_no_mounts_cgroups_or_processes",
        false,
    ) else {
        return;
    };
    a.run("c1", &spec(&["sleep", "1000"]));
    a.run("c2", &spec(&["sh", "-c", "sleep 1000 & sleep 1000"]));
    a.exec("c1", "e", &["sleep", "1000"]);
    let mut pids = a.pids("c1");
    pids.extend(a.pids("c2"));
    assert_eq!(pids.len(), 4, "{pids:?}");
    a.client
        .pause_container(
            ctx(),
            &PauseContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .expect("PauseContainer");

    let v = a
        .health
        .version(ctx(), &CheckRequest::new())
        .expect("Version");
    assert!(!v.agent_version.is_empty());
    let d = a
        .client
        .get_guest_details(ctx(), &GuestDetailsRequest::new())
        .expect("GetGuestDetails");
    assert!(
        d.cpu_count >= 1
            && d.mem_total_bytes > 0
            && !d.kernel_version.is_empty()
            && d.boot_id.len() == 36
    );

    a.client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .expect("DestroySandbox");
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)),
        Some(0),
        "agent exits after DestroySandbox"
    );
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "process {p} survived"
        );
    }
    assert!(
        !cgroup_dir(&a.cgroup_parent).exists(),
        "cgroups left: {}",
        a.cgroup_parent
    );
    assert_eq!(a.host_mounts_under_dir(), Vec::<String>::new());
}

/// An exec's stdin fed in 64 KiB WriteStdin calls (as the shim does) while
/// its stdout is read concurrently: everything comes back, in order.
#[test]
fn large_exec_stdin_comes_back_whole() {
    let Some(a) = pod_for("large_exec_stdin_comes_back_whole", false) else {
        return;
    };
    a.run("shell", &spec(&["sleep", "1000"]));
    a.exec("shell", "cat", &["cat"]);
    let input: String = (0..5000).map(|i| format!("exec line {i}\n")).collect();
    let reader = {
        let client = a.client.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            loop {
                let req = ReadStreamRequest {
                    container_id: "shell".into(),
                    exec_id: "cat".into(),
                    len: 64 * 1024,
                    ..Default::default()
                };
                let data = client.read_stdout(ctx(), &req).expect("ReadStdout").data;
                if data.is_empty() {
                    return out;
                }
                out.extend(data);
            }
        })
    };
    for chunk in input.as_bytes().chunks(64 * 1024) {
        let w = WriteStreamRequest {
            container_id: "shell".into(),
            exec_id: "cat".into(),
            data: chunk.to_vec(),
            ..Default::default()
        };
        assert_eq!(
            a.client.write_stdin(ctx(), &w).expect("WriteStdin").len as usize,
            chunk.len()
        );
    }
    let c = CloseStdinRequest {
        container_id: "shell".into(),
        exec_id: "cat".into(),
        ..Default::default()
    };
    a.client.close_stdin(ctx(), &c).expect("CloseStdin");
    assert_eq!(a.wait("shell", "cat"), 0);
    let out = reader.join().expect("reader thread");
    assert!(
        out == input.as_bytes(),
        "{} of {} bytes back",
        out.len(),
        input.len()
    );
}
