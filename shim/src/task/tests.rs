//! The Task logic against a fake agent ([`super::fake`]): orderings, exits
//! and OOM events, ttrpc codes, a VM death under the calls, and the pod
//! lock never held while the agent is slow. The share's mounts are real
//! (a bind of the bundle's rootfs), so these need root and say so when
//! skipped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PidsRequest, StartRequest,
    StateRequest, StatsRequest, WaitRequest,
};
use containerd_shim::protos::api::Status;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::ExitSignal;
use tokio::sync::mpsc;

mod network;

use super::fake::{FakeAgent, FakeLauncher};
use super::{EventMessage, EventSenders, Inner, PodService};
use crate::settings::config::Config;

/// How long a call that must not wait on the agent may take.
const PROMPT: Duration = Duration::from_secs(1);

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: the share's mounts need root");
    false
}

struct Pod {
    tmp: tempfile::TempDir,
    agent: Arc<FakeAgent>,
    launcher: Arc<FakeLauncher>,
    service: PodService,
    events: mpsc::UnboundedReceiver<EventMessage>,
    oom: mpsc::Receiver<EventMessage>,
    exit: Arc<ExitSignal>,
    /// The bundles' `linux.namespaces`, when a test sets them; else, as
    /// from CRI, the first container's asks for a network namespace (the
    /// shim makes one: loopback only) and later ones name the pod's.
    namespaces: std::sync::Mutex<Option<serde_json::Value>>,
}

impl Pod {
    fn new() -> Pod {
        let tmp = tempfile::tempdir().expect("temp dir");
        let agent = FakeAgent::new();
        let launcher = FakeLauncher::new(&tmp.path().join("state"), agent.clone());
        let (lifecycle, events) = mpsc::unbounded_channel();
        let (oom_tx, oom) = mpsc::channel(super::OOM_EVENT_QUEUE);
        let exit = Arc::new(ExitSignal::default());
        let service = PodService::with_launcher(
            "test",
            Config::default(),
            launcher.clone(),
            EventSenders {
                lifecycle,
                oom: oom_tx,
            },
            exit.clone(),
        );
        Pod {
            tmp,
            agent,
            launcher,
            service,
            events,
            oom,
            exit,
            namespaces: std::sync::Mutex::new(None),
        }
    }

    /// Later bundles get these `linux.namespaces`.
    fn set_namespaces(&self, namespaces: serde_json::Value) {
        *self.namespaces.lock().unwrap() = Some(namespaces);
    }

    fn namespaces(&self) -> serde_json::Value {
        if let Some(namespaces) = self.namespaces.lock().unwrap().clone() {
            return namespaces;
        }
        match self.inner().pod().vm.as_ref() {
            Some(vm) => serde_json::json!([{"type": "network", "path": vm.network.netns_path()}]),
            None => serde_json::json!([{"type": "network"}]),
        }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.service.inner
    }

    /// A bundle for container `id` with these annotations.
    fn bundle(&self, id: &str, annotations: &[(&str, &str)]) -> String {
        let bundle = self.tmp.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs/bin")).expect("rootfs");
        let annotations: serde_json::Map<_, _> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"namespaces": self.namespaces()},
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).expect("config.json");
        bundle.display().to_string()
    }

    async fn create(&self, id: &str, annotations: &[(&str, &str)]) -> ttrpc::Result<u32> {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, annotations),
            ..Default::default()
        };
        self.inner().create(req).await.map(|r| r.pid)
    }

    async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.inner().start(req).await.map(|r| r.pid)
    }

    fn state(&self, id: &str, exec_id: &str) -> ttrpc::Result<(Status, u32)> {
        let req = StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let state = self.inner().state(req)?;
        Ok((state.status.enum_value_or_default(), state.exit_status))
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32) -> ttrpc::Result<()> {
        let req = KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        self.inner().kill(req).await.map(drop)
    }

    async fn wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let waited = tokio::time::timeout(Duration::from_secs(10), self.inner().wait(req));
        waited.await.expect("Wait answers").map(|w| w.exit_status)
    }

    fn exec(&self, id: &str, exec_id: &str, type_url: &str) -> ttrpc::Result<()> {
        let req = ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            spec: MessageField::some(Any {
                type_url: type_url.into(),
                value: br#"{"args":["/bin/true"],"cwd":"/"}"#.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.inner().exec(req).map(drop)
    }

    async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let req = DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.inner().delete(req).await.map(|d| d.exit_status)
    }

    async fn pids(&self, id: &str) -> ttrpc::Result<usize> {
        let req = PidsRequest {
            id: id.into(),
            ..Default::default()
        };
        self.inner().pids(req).await.map(|p| p.processes.len())
    }

    /// The topics published so far.
    fn topics(&mut self) -> Vec<String> {
        let mut topics = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            topics.push(event.topic());
        }
        topics
    }

    fn state_dir(&self, pod: &str) -> std::path::PathBuf {
        self.launcher.root.join("test").join(pod)
    }
}

fn code(result: ttrpc::Result<impl std::fmt::Debug>) -> Code {
    match result {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected a ttrpc status, got {other:?}"),
    }
}

const EXEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
const CRI_CONTAINER: [(&str, &str); 2] = [
    ("io.kubernetes.cri.container-type", "container"),
    ("io.kubernetes.cri.sandbox-id", "pod"),
];
const CRI_SANDBOX: [(&str, &str); 1] = [("io.kubernetes.cri.container-type", "sandbox")];

/// Waits (bounded) until the fake agent saw `call`.
async fn until_called(agent: &FakeAgent, call: &str) {
    let since = Instant::now();
    while !agent.calls().iter().any(|c| c == call) {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{call} never came: {:?}",
            agent.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_lives_in_order_from_create_to_delete() {
    if !is_root() {
        return;
    }
    let mut pod = Pod::new();
    pod.create("pod", &CRI_SANDBOX)
        .await
        .expect("create boots the VM");
    assert_eq!(
        pod.agent.calls(),
        ["create_sandbox pod", "create_container pod"]
    );
    assert_eq!(pod.state("pod", "").expect("state").0, Status::CREATED);
    pod.start("pod", "").await.expect("start");
    assert_eq!(pod.state("pod", "").expect("state").0, Status::RUNNING);
    assert_eq!(
        code(pod.start("pod", "").await),
        Code::FAILED_PRECONDITION,
        "started twice"
    );

    pod.create("web", &CRI_CONTAINER)
        .await
        .expect("a second container joins the VM");
    pod.start("web", "").await.expect("start web");
    pod.exec("web", "e1", EXEC_TYPE).expect("exec");
    assert_eq!(pod.state("web", "e1").expect("state").0, Status::CREATED);
    pod.start("web", "e1").await.expect("start exec");
    pod.agent.exit("web", "e1", 3);
    assert_eq!(pod.wait("web", "e1").await.expect("wait"), 3);
    assert_eq!(pod.delete("web", "e1").await.expect("delete exec"), 3);
    assert_eq!(code(pod.state("web", "e1")), Code::NOT_FOUND);

    pod.kill("web", "", 15).await.expect("kill");
    assert_eq!(pod.wait("web", "").await.expect("wait"), 128 + 15);
    assert_eq!(pod.delete("web", "").await.expect("delete web"), 128 + 15);
    pod.kill("pod", "", 9).await.expect("kill the sandbox");
    assert_eq!(pod.wait("pod", "").await.expect("wait"), 137);
    assert_eq!(pod.delete("pod", "").await.expect("delete pod"), 137);

    let calls = pod.agent.calls();
    let position = |call: &str| {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call}: {calls:?}"))
    };
    assert!(position("remove_container web") < position("remove_container pod"));
    assert!(
        position("remove_container pod") < position("destroy_sandbox "),
        "{calls:?}"
    );
    let topics = pod.topics();
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exit",
        "/tasks/delete",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(topics, expected);
    assert!(
        !pod.state_dir("pod").exists(),
        "the pod's state directory is gone"
    );
    pod.service.shutdown_if_empty();
    tokio::time::timeout(PROMPT, pod.exit.wait())
        .await
        .expect("the shim exits with its last container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_kill_answer_while_another_container_is_created_against_a_slow_agent() {
    if !is_root() {
        return;
    }
    let pod = Arc::new(Pod::new());
    pod.create("pod", &CRI_SANDBOX).await.expect("create");
    pod.start("pod", "").await.expect("start");
    pod.agent.hold("create_container", true);
    let creating = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.create("web", &CRI_CONTAINER).await })
    };
    until_called(&pod.agent, "create_container web").await;

    let asked = Instant::now();
    let state = tokio::time::timeout(PROMPT, async { pod.state("pod", "") }).await;
    assert_eq!(
        state.expect("State answers at once").expect("state").0,
        Status::RUNNING
    );
    let pids = tokio::time::timeout(PROMPT, pod.pids("pod")).await;
    assert_eq!(pids.expect("Pids answers at once").expect("pids"), 2);
    let killed = tokio::time::timeout(PROMPT, pod.kill("pod", "", 15)).await;
    killed.expect("Kill answers at once").expect("kill");
    let waited = tokio::time::timeout(PROMPT, pod.wait("pod", "")).await;
    assert_eq!(
        waited.expect("Wait answers at once").expect("wait"),
        128 + 15
    );
    assert!(asked.elapsed() < PROMPT * 2, "took {:?}", asked.elapsed());
    assert!(
        !creating.is_finished(),
        "the create is still held in the agent"
    );

    pod.agent.hold("create_container", false);
    creating
        .await
        .expect("joined")
        .expect("the create finishes once the agent answers");
    assert_eq!(pod.state("web", "").expect("state").0, Status::CREATED);
    pod.agent.die(9);
    // The VM watcher takes the pod's mounts and state down.
    assert_eq!(pod.wait("web", "").await.expect("wait"), 255);
    pod.delete("web", "").await.expect("delete web");
    pod.delete("pod", "").await.expect("delete pod");
    assert!(!pod.state_dir("pod").exists(), "nothing is left of the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_containerd_with_the_right_codes() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    assert_eq!(
        code(pod.create("web", &CRI_CONTAINER).await),
        Code::FAILED_PRECONDITION,
        "no VM yet"
    );
    let bad = CreateTaskRequest {
        id: "nobundle".into(),
        bundle: pod.tmp.path().join("missing").display().to_string(),
        ..Default::default()
    };
    assert_eq!(code(pod.inner().create(bad).await), Code::INVALID_ARGUMENT);
    let checkpoint = CreateTaskRequest {
        id: "pod".into(),
        bundle: pod.bundle("pod", &[]),
        checkpoint: "/cp".into(),
        ..Default::default()
    };
    assert_eq!(
        code(pod.inner().create(checkpoint).await),
        Code::UNIMPLEMENTED
    );
    let vcpus = [("io.podbox.vcpus", "2")];
    assert_eq!(
        code(pod.create("pod", &vcpus).await),
        Code::INVALID_ARGUMENT,
        "annotation not allowed"
    );

    *pod.launcher.fail.lock().expect("lock") = Some("no agent".into());
    assert_eq!(
        code(pod.create("pod", &[]).await),
        Code::INTERNAL,
        "boot failure"
    );
    *pod.launcher.fail.lock().expect("lock") = None;

    pod.create("pod", &[]).await.expect("create");
    assert_eq!(code(pod.create("pod", &[]).await), Code::ALREADY_EXISTS);
    assert_eq!(code(pod.state("other", "")), Code::NOT_FOUND);
    assert_eq!(code(pod.state("pod", "nope")), Code::NOT_FOUND);
    assert_eq!(
        code(pod.exec("pod", "e1", "types.example/Other")),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(code(pod.exec("pod", "", EXEC_TYPE)), Code::ALREADY_EXISTS);
    pod.agent.fail("start_container", Code::INVALID_ARGUMENT);
    assert_eq!(
        code(pod.start("pod", "").await),
        Code::INVALID_ARGUMENT,
        "the agent's code passes through"
    );
    assert_eq!(
        pod.state("pod", "").expect("state").0,
        Status::CREATED,
        "a failed start leaves it created"
    );
    pod.agent.fail("list_processes", Code::UNAVAILABLE);
    let pids = pod.pids("pod").await;
    assert_eq!(code(pids), Code::UNAVAILABLE);
    assert_eq!(
        pod.delete("pod", "")
            .await
            .expect("a created container can be deleted"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_leaves_no_vm_and_a_retry_boots_again() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    pod.agent.fail("create_container", Code::INVALID_ARGUMENT);
    assert_eq!(code(pod.create("pod", &[]).await), Code::INVALID_ARGUMENT);
    assert!(
        pod.agent.calls().iter().any(|c| c == "destroy_sandbox "),
        "the VM was stopped"
    );
    assert!(!pod.state_dir("pod").exists(), "nothing is left of the pod");
    assert!(pod.inner().pod().vm.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_death_ends_every_task_and_every_later_call_fails_cleanly() {
    if !is_root() {
        return;
    }
    let mut pod = Pod::new();
    pod.create("pod", &[]).await.expect("create");
    pod.start("pod", "").await.expect("start");
    pod.exec("pod", "e1", EXEC_TYPE).expect("exec");
    pod.start("pod", "e1").await.expect("start exec");
    pod.create("late", &CRI_CONTAINER)
        .await
        .expect("create a second container");
    pod.agent.hold("create_container", true);
    let creating = pod.create("web", &CRI_CONTAINER);
    let die = async {
        until_called(&pod.agent, "create_container web").await;
        pod.agent.die(9);
    };
    let (created, ()) = tokio::join!(creating, die);
    assert_eq!(
        code(created),
        Code::UNAVAILABLE,
        "a create under a dying VM fails"
    );

    assert_eq!(
        pod.wait("pod", "").await.expect("wait"),
        super::pod::VM_LOST_EXIT_STATUS
    );
    assert_eq!(
        pod.wait("pod", "e1").await.expect("wait"),
        super::pod::VM_LOST_EXIT_STATUS
    );
    assert_eq!(
        pod.wait("late", "").await.expect("wait"),
        super::pod::VM_LOST_EXIT_STATUS,
        "never started, still ended"
    );
    assert_eq!(pod.state("pod", "").expect("state"), (Status::STOPPED, 255));
    let exits = pod.topics().iter().filter(|t| *t == "/tasks/exit").count();
    assert_eq!(exits, 3, "one TaskExit per process");
    assert_eq!(
        code(pod.kill("pod", "", 9).await),
        Code::NOT_FOUND,
        "already finished"
    );
    assert_eq!(code(pod.start("late", "").await), Code::UNAVAILABLE);
    let pids = pod.pids("pod").await;
    assert_eq!(code(pids), Code::UNAVAILABLE);
    let stats = pod
        .inner()
        .stats(StatsRequest {
            id: "pod".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(stats), Code::UNAVAILABLE);
    assert_eq!(
        code(pod.inner().set_paused("pod", true).await),
        Code::UNAVAILABLE
    );
    assert_eq!(
        code(pod.exec("pod", "e2", EXEC_TYPE)),
        Code::FAILED_PRECONDITION
    );
    pod.delete("late", "").await.expect("delete");
    assert_eq!(pod.delete("pod", "e1").await.expect("delete exec"), 255);
    assert_eq!(pod.delete("pod", "").await.expect("delete"), 255);
    assert!(!pod.state_dir("pod").exists(), "nothing is left of the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_over_a_broken_agent_connection_fails_unavailable_and_changes_nothing() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    pod.create("pod", &[]).await.expect("create");
    pod.start("pod", "").await.expect("start");
    pod.create("web", &CRI_CONTAINER).await.expect("create web");
    pod.exec("pod", "e1", EXEC_TYPE).expect("exec");
    pod.agent.break_connection();
    let unreachable = |result: ttrpc::Result<()>, call: &str| match result {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), Code::UNAVAILABLE, "{call}: {s:?}");
            assert!(s.message.contains("unreachable"), "{call}: {}", s.message);
        }
        other => panic!("{call}: {other:?}"),
    };
    unreachable(pod.start("web", "").await.map(drop), "Start");
    unreachable(pod.start("pod", "e1").await.map(drop), "Start exec");
    unreachable(pod.kill("web", "", 15).await, "Kill");
    unreachable(pod.pids("pod").await.map(drop), "Pids");
    unreachable(pod.inner().set_paused("pod", true).await.map(drop), "Pause");
    let stats = pod.inner().stats(StatsRequest {
        id: "pod".into(),
        ..Default::default()
    });
    unreachable(stats.await.map(drop), "Stats");
    let create = pod.create("late", &CRI_CONTAINER).await;
    unreachable(create.map(drop), "Create");
    assert!(
        code(pod.state("late", "")) == Code::NOT_FOUND,
        "a failed Create leaves nothing"
    );
    // Nothing changed: what was created is still created (a started
    // process whose wait broke is lost: status 255).
    assert_eq!(pod.state("web", "").expect("state").0, Status::CREATED);
    assert_eq!(pod.state("pod", "e1").expect("state").0, Status::CREATED);
    assert_eq!(pod.wait("pod", "").await.expect("wait"), 255);
    pod.agent.die(9);
    assert_eq!(pod.wait("web", "").await.expect("wait"), 255);
    pod.delete("web", "").await.expect("delete web");
    pod.delete("pod", "").await.expect("delete");
    assert!(!pod.state_dir("pod").exists(), "nothing is left of the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_shutdown_wait_for_what_is_under_way() {
    if !is_root() {
        return;
    }
    let pod = Arc::new(Pod::new());
    pod.create("pod", &CRI_SANDBOX).await.expect("create");
    // A Delete while Start is in the agent is refused: the process may be
    // running already.
    pod.agent.hold("start_container", true);
    let starting = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.start("pod", "").await })
    };
    until_called(&pod.agent, "start_container pod").await;
    assert_eq!(code(pod.delete("pod", "").await), Code::FAILED_PRECONDITION);
    pod.agent.hold("start_container", false);
    starting.await.expect("joined").expect("the start finishes");
    assert_eq!(pod.state("pod", "").expect("state").0, Status::RUNNING);

    // containerd's Delete of a container whose Create is under way (its
    // Create call timed out) waits for it, then deletes it.
    pod.agent.hold("create_container", true);
    let creating = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.create("web", &CRI_CONTAINER).await })
    };
    until_called(&pod.agent, "create_container web").await;
    let deleting = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.delete("web", "").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!deleting.is_finished(), "Delete waits for the Create");
    pod.agent.hold("create_container", false);
    creating.await.expect("joined").expect("created");
    assert_eq!(deleting.await.expect("joined").expect("deleted"), 0);
    assert_eq!(code(pod.state("web", "")), Code::NOT_FOUND);

    // Shutdown while the only other Create is under way, and it fails:
    // the shim still exits once it is done.
    pod.kill("pod", "", 9).await.expect("kill");
    pod.wait("pod", "").await.expect("wait");
    pod.delete("pod", "").await.expect("delete the sandbox");
    pod.agent.hold("create_container", true);
    pod.agent.fail("create_container", Code::INVALID_ARGUMENT);
    let creating = {
        let pod = pod.clone();
        tokio::spawn(async move { pod.create("again", &[]).await })
    };
    until_called(&pod.agent, "create_container again").await;
    pod.service.shutdown_if_empty();
    let early = tokio::time::timeout(Duration::from_millis(200), pod.exit.wait()).await;
    assert!(early.is_err(), "no exit while a Create is under way");
    pod.agent.hold("create_container", false);
    assert_eq!(
        code(creating.await.expect("joined")),
        Code::INVALID_ARGUMENT
    );
    tokio::time::timeout(PROMPT, pod.exit.wait())
        .await
        .expect("the shim exits once the failed Create is done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_events_are_published_only_for_the_pods_containers() {
    if !is_root() {
        return;
    }
    let mut pod = Pod::new();
    pod.create("pod", &[]).await.expect("create");
    pod.agent.oom("someone-else");
    pod.agent.oom("pod");
    let event = tokio::time::timeout(Duration::from_secs(10), pod.oom.recv()).await;
    assert_eq!(
        event.expect("an OOM event").expect("open").topic(),
        "/tasks/oom"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        pod.oom.try_recv().is_err(),
        "the foreign id was not passed on"
    );
    pod.delete("pod", "").await.expect("delete");
}

#[test]
fn the_fake_bundle_parses_as_a_typed_spec() {
    let pod = Pod::new();
    let bundle = pod.bundle("x", &CRI_SANDBOX);
    let spec = crate::spec::load(Path::new(&bundle)).expect("typed spec");
    assert_eq!(crate::spec::annotations(&spec).len(), 1);
}

/// A guest that stops answering (a hung or SIGSTOPped VM) over a real ttrpc
/// client, whose connection stays open: the call ends at its deadline with
/// DEADLINE_EXCEEDED naming the call and the deadline, not UNAVAILABLE and
/// not never. The text ttrpc reports a timeout with is what `is_timeout`
/// keys on, so this pins it to the ttrpc version in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_is_deadline_exceeded() {
    use std::os::fd::IntoRawFd;
    let (ours, _silent_guest) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let client = ttrpc::Client::new(ours.into_raw_fd()).expect("a ttrpc client");
    let agent = podbox_protocol::agent_ttrpc::AgentServiceClient::new(client);
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let result = super::agent_call("ExecProcess", limit, move |ctx| {
        agent.exec_process(ctx, &Default::default())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the call ended at its deadline"
    );
    match result {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), Code::DEADLINE_EXCEEDED, "{s:?}");
            assert!(
                s.message.contains("ExecProcess")
                    && s.message.contains("did not answer within 300ms"),
                "{}",
                s.message
            );
        }
        other => panic!("expected DEADLINE_EXCEEDED, got {other:?}"),
    }
}

/// A dying VM breaks the agent's connection a moment before its VMM is
/// reaped: the tasks stay running until the VM is gone, and then get the
/// VM watcher's exit (which logs why the VM ended first), not an exit of
/// their own waiters that would have containerd delete the pod while its
/// VM's end is still unexplained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_agent_connection_ends_no_task_before_the_vm_is_gone() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    pod.create("pod", &[]).await.expect("create");
    pod.start("pod", "").await.expect("start");
    pod.agent.break_connection();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pod.state("pod", "").expect("state").0,
        Status::RUNNING,
        "no exit while the VMM still runs"
    );
    pod.agent.die(2);
    assert_eq!(pod.wait("pod", "").await.expect("wait"), 255);
    pod.delete("pod", "").await.expect("delete");
}
