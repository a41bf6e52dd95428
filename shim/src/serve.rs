//! The long-lived shim process: serves containerd's Task API on the ttrpc
//! socket `start` chose, publishes events to containerd (reconnecting
//! when containerd restarts: [`Publisher`]), logs to the
//! bundle's `log` FIFO (containerd copies it into its own log), and tears
//! the pod down when it ends.
//!
//! The server is assembled here, and spawned by [`crate::service`], instead
//! of with containerd-shim 0.12's `asynchronous::run` and `spawn`, for what
//! those lack:
//!
//! 1. `run` registers only what `create_task()` returns, the service named
//!    `containerd.task.v3.Task` (containerd 2's name); containerd 1.6 calls
//!    `containerd.task.v2.Task`, so every call would find no service. Here
//!    both names are registered, for the same handlers.
//! 2. `run`'s reaper answers SIGCHLD with `waitpid(-1)` and would steal
//!    podbox-vmm's exit status from the supervisor that waits for it
//!    (unless its `Config::no_reaper` is set).
//! 3. `spawn` waits for the start handshake without a timeout (it copies
//!    the server's stdout to stderr until EOF, so a server that hangs
//!    before serving hangs `start`), and does not start the server in a
//!    process group of its own (it stays in the `start` command's group,
//!    and gets whatever signal is sent to that group).
//!    [`crate::service`] waits at most its `START_HANDSHAKE_TIMEOUT`, then
//!    kills the server, and starts it with `process_group(0)`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::shim_async::{Client, EventsClient};
use containerd_shim::protos::ttrpc::asynchronous::transport::Listener;
use containerd_shim::protos::ttrpc::asynchronous::Server;
use containerd_shim::{ExitSignal, Flags, Task};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::settings::config::{Config, ConfigError};
use crate::task::{EventMessage, PodService};

/// The environment variable `start` uses to hand the runtime options'
/// config path to the server it spawns.
pub const CONFIG_PATH_ENV: &str = "PODBOX_SHIM_CONFIG_PATH";
const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("-socket is required to serve")]
    NoSocket,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TTRPC_ADDRESS is not set: containerd sets it for its shims")]
    NoTtrpcAddress,
    #[error("connecting the event publisher to {address}: {reason}")]
    Publisher { address: String, reason: String },
    #[error("listening on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ttrpc server: {0}")]
    Server(String),
}

/// Serves until the pod's last container is deleted.
pub async fn serve(flags: Flags) -> Result<(), ServeError> {
    if flags.socket.is_empty() {
        return Err(ServeError::NoSocket);
    }
    let config_path = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
    let config = Config::load(config_path.as_deref())?;
    init_logging(&config.log_level, flags.debug);
    tracing::info!(id = %flags.id, namespace = %flags.namespace, socket = %flags.socket, "podbox shim serving");

    let ttrpc_address = std::env::var("TTRPC_ADDRESS").map_err(|_| ServeError::NoTtrpcAddress)?;
    let mut publisher = Publisher::connect(&ttrpc_address, &flags.namespace)
        .await
        .map_err(|reason| ServeError::Publisher {
            address: ttrpc_address.clone(),
            reason,
        })?;
    let (lifecycle, mut lifecycle_rx) = mpsc::unbounded_channel::<EventMessage>();
    let (oom, mut oom_rx) = mpsc::channel::<EventMessage>(crate::task::OOM_EVENT_QUEUE);
    let events_tx = crate::task::EventSenders { lifecycle, oom };
    let publishing = tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                Some(event) = lifecycle_rx.recv() => event,
                Some(event) = oom_rx.recv() => event,
                else => break,
            };
            let topic = event.topic();
            publisher.publish(&topic, event).await;
        }
    });

    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(PodService::new(
        &flags.namespace,
        config,
        events_tx,
        exit.clone(),
    ));
    let socket_path = PathBuf::from(
        flags
            .socket
            .strip_prefix("unix://")
            .unwrap_or(&flags.socket),
    );
    let listener = listen(&socket_path)?;
    let listener = Listener::try_from(listener).map_err(|e| ServeError::Server(e.to_string()))?;
    let task: Arc<dyn Task + Send + Sync> = service.clone();
    let mut services = create_task(task.clone());
    // containerd-shim-protos 0.12 names the service after containerd 2's API
    // (containerd.task.v3.Task); containerd 1.6 calls the same messages as
    // containerd.task.v2.Task. Serve both names.
    if let Some(v2) = create_task(task).remove(TASK_SERVICE_V3) {
        services.insert(TASK_SERVICE_V2.to_string(), v2);
    }
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server
        .start()
        .await
        .map_err(|e| ServeError::Server(e.to_string()))?;
    // `start` reads our stdout until it closes: that is the "ready" signal.
    release_stdout();

    exit.wait().await;
    tracing::info!("shutting down");
    service.cleanup().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket_path);
    // Give queued events (TaskDelete of the last container) a moment to go out.
    drop(service);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), publishing).await;
    Ok(())
}

/// How long one event's forward to containerd may take, and how long the
/// shim keeps trying to deliver one event while containerd is away (a
/// restart takes seconds): past that the event is dropped, logged; a
/// restarted containerd learns of exits through Wait and State anyway.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
const DELIVERY_PATIENCE: Duration = Duration::from_secs(60);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Publishes the shim's events to containerd's ttrpc socket (Events.Forward),
/// in order, one at a time. containerd-shim's RemotePublisher reconnects only
/// on the ttrpc errors RemoteClosed/LocalClosed; a connection to a containerd
/// that was restarted fails with others, and it then retried the dead
/// connection until it dropped the event, so no event of the pod reached a
/// restarted containerd. Here any failure drops the connection, and the
/// next attempt dials containerd again.
struct Publisher {
    address: String,
    namespace: String,
    client: Option<EventsClient>,
}

impl Publisher {
    async fn connect(address: &str, namespace: &str) -> Result<Self, String> {
        let client = dial(address).await?;
        Ok(Publisher {
            address: address.to_string(),
            namespace: namespace.to_string(),
            client: Some(client),
        })
    }

    async fn publish(&mut self, topic: &str, event: EventMessage) {
        let message: Box<dyn containerd_shim::protos::protobuf::MessageDyn> = event;
        let envelope = match containerd_shim::util::convert_to_any(message) {
            Ok(any) => Envelope {
                timestamp: containerd_shim::util::timestamp().ok().into(),
                namespace: self.namespace.clone(),
                topic: topic.to_string(),
                event: Some(any).into(),
                ..Default::default()
            },
            Err(e) => {
                tracing::warn!("encoding {topic}: {e}");
                return;
            }
        };
        let request = ForwardRequest {
            envelope: Some(envelope).into(),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let error = match self.client.take() {
                Some(client) => {
                    let ctx = containerd_shim::protos::ttrpc::context::with_timeout(
                        FORWARD_TIMEOUT.as_nanos() as i64,
                    );
                    match client.forward(ctx, &request).await {
                        Ok(_) => {
                            self.client = Some(client);
                            return;
                        }
                        Err(e) => e.to_string(),
                    }
                }
                None => match dial(&self.address).await {
                    Ok(client) => {
                        self.client = Some(client);
                        continue;
                    }
                    Err(e) => e,
                },
            };
            if started.elapsed() > DELIVERY_PATIENCE {
                tracing::warn!("dropping event {topic} after {DELIVERY_PATIENCE:?}: {error}");
                return;
            }
            tracing::debug!("publishing {topic}: {error}; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
        }
    }
}

/// A ttrpc connection to containerd's events service at `address`.
async fn dial(address: &str) -> Result<EventsClient, String> {
    let address = address.to_string();
    let fd = tokio::task::spawn_blocking(move || containerd_shim::util::connect(address))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // SAFETY: `fd` is the connected unix socket connect() just returned,
    // owned by nothing else; the client takes it over.
    Ok(EventsClient::new(unsafe {
        Client::from_raw_unix_socket_fd(fd)
    }))
}

fn listen(path: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let listen_error = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_error)?;
    }
    // `start` only spawns us when nothing serves this address; a file there is stale.
    if path.exists() {
        std::fs::remove_file(path).map_err(listen_error)?;
    }
    std::os::unix::net::UnixListener::bind(path).map_err(listen_error)
}

fn release_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto our own stdout.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// Logs go to the bundle's `log` FIFO (the shim's cwd), which containerd
/// reads; stderr where there is none (running by hand).
fn init_logging(level: &str, debug: bool) {
    let level = if debug { "debug" } else { level };
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{level},ttrpc=warn"))
        .unwrap_or_else(|_| "info".into());
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    match fifo {
        Ok(file) => {
            clear_nonblock(&file);
            let _ = builder.with_writer(std::sync::Mutex::new(file)).try_init();
        }
        Err(_) => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
}

trait NonblockOpen {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonblockOpen for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        // containerd opens the reading end before it starts us; non-blocking
        // so that a missing reader fails the open instead of hanging it.
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn clear_nonblock(file: &std::fs::File) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}
