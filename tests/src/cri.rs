//! A small CRI client (the `runtime.v1` API that containerd 1.6 serves on its
//! gRPC socket), standing in for crictl, which no reachable registry has.
//!
//! Calls block: the client owns a current-thread tokio runtime, so plain
//! `#[test]` functions and `Drop` implementations can use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatus, CreateContainerRequest, ExecSyncRequest,
    ImageSpec, LinuxPodSandboxConfig, ListContainersRequest, ListImagesRequest,
    ListPodSandboxRequest, PodSandbox, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, PodSandboxStatusResponse, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1::Container;

#[derive(Debug, Error)]
pub enum CriError {
    #[error("creating the CRI client's tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connecting to the CRI socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("CRI {call}: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("CRI {call}: the response lacks {field}")]
    MissingField {
        call: &'static str,
        field: &'static str,
    },
}

/// What `ExecSync` gave back.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A blocking CRI client on one containerd gRPC socket.
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    runtime_service: RuntimeServiceClient<Channel>,
    image_service: ImageServiceClient<Channel>,
}

impl CriClient {
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let socket_path = socket.to_path_buf();
        let channel = runtime
            .block_on(async {
                // The URI is never dialled: the connector below always opens the unix socket.
                Endpoint::from_static("http://[::]:0")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket_path = socket_path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                UnixStream::connect(socket_path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            runtime,
            runtime_service: RuntimeServiceClient::new(channel.clone()),
            image_service: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`) by type.
    pub fn conditions(&mut self) -> Result<HashMap<String, bool>, CriError> {
        let response = rpc(
            &self.runtime,
            "Status",
            self.runtime_service
                .status(StatusRequest { verbose: false }),
        )?;
        let status = response.status.ok_or(CriError::MissingField {
            call: "Status",
            field: "status",
        })?;
        Ok(status
            .conditions
            .into_iter()
            .map(|c| (c.r#type, c.status))
            .collect())
    }

    /// The image references the CRI plugin knows (its `k8s.io` namespace).
    pub fn list_image_tags(&mut self) -> Result<Vec<String>, CriError> {
        let response = rpc(
            &self.runtime,
            "ListImages",
            self.image_service
                .list_images(ListImagesRequest { filter: None }),
        )?;
        Ok(response
            .images
            .into_iter()
            .flat_map(|image| image.repo_tags)
            .collect())
    }

    /// Starts a pod sandbox with the given runtime handler; returns its id.
    pub fn run_pod_sandbox(
        &mut self,
        config: &PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CriError> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.to_string(),
        };
        let response = rpc(
            &self.runtime,
            "RunPodSandbox",
            self.runtime_service.run_pod_sandbox(request),
        )?;
        Ok(response.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(
        &mut self,
        pod_id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose,
        };
        rpc(
            &self.runtime,
            "PodSandboxStatus",
            self.runtime_service.pod_sandbox_status(request),
        )
    }

    /// The pod's network namespace path, from the verbose status
    /// containerd 1.6 gives (`info["info"]` is JSON with the runtime spec).
    pub fn pod_netns_path(&mut self, pod_id: &str) -> Result<Option<PathBuf>, CriError> {
        let status = self.pod_sandbox_status(pod_id, true)?;
        let Some(info) = status.info.get("info") else {
            return Ok(None);
        };
        let Ok(info) = serde_json::from_str::<serde_json::Value>(info) else {
            return Ok(None);
        };
        let namespaces = info
            .pointer("/runtimeSpec/linux/namespaces")
            .and_then(|n| n.as_array());
        let path = namespaces
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|path| !path.is_empty())
            .map(PathBuf::from);
        Ok(path)
    }

    /// The pod's IP as the CRI reports it (what CNI assigned).
    pub fn pod_ip(&mut self, pod_id: &str) -> Result<String, CriError> {
        let status = self.pod_sandbox_status(pod_id, false)?;
        status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or(CriError::MissingField {
                call: "PodSandboxStatus",
                field: "status.network.ip",
            })
    }

    pub fn list_pod_sandboxes(&mut self) -> Result<Vec<PodSandbox>, CriError> {
        let response = rpc(
            &self.runtime,
            "ListPodSandbox",
            self.runtime_service
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )?;
        Ok(response.items)
    }

    pub fn stop_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        rpc(
            &self.runtime,
            "StopPodSandbox",
            self.runtime_service.stop_pod_sandbox(request),
        )?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&mut self, pod_id: &str) -> Result<(), CriError> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        rpc(
            &self.runtime,
            "RemovePodSandbox",
            self.runtime_service.remove_pod_sandbox(request),
        )?;
        Ok(())
    }

    /// Creates a container in a pod; `sandbox_config` must be the config the
    /// pod was started with (CRI wants it again). Returns the container id.
    pub fn create_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let response = rpc(
            &self.runtime,
            "CreateContainer",
            self.runtime_service.create_container(request),
        )?;
        Ok(response.container_id)
    }

    pub fn start_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = StartContainerRequest {
            container_id: container_id.to_string(),
        };
        rpc(
            &self.runtime,
            "StartContainer",
            self.runtime_service.start_container(request),
        )?;
        Ok(())
    }

    /// A container's CPU and memory use, as the kubelet reads it.
    pub fn container_stats(
        &mut self,
        container_id: &str,
    ) -> Result<k8s_cri::v1::ContainerStats, CriError> {
        let request = k8s_cri::v1::ContainerStatsRequest {
            container_id: container_id.to_string(),
        };
        let response = rpc(
            &self.runtime,
            "ContainerStats",
            self.runtime_service.container_stats(request),
        )?;
        response.stats.ok_or(CriError::MissingField {
            call: "ContainerStats",
            field: "stats",
        })
    }

    /// Changes a running container's limits (kubelet's in-place resize).
    pub fn update_container_resources(
        &mut self,
        container_id: &str,
        resources: k8s_cri::v1::LinuxContainerResources,
    ) -> Result<(), CriError> {
        let request = k8s_cri::v1::UpdateContainerResourcesRequest {
            container_id: container_id.to_string(),
            linux: Some(resources),
            ..Default::default()
        };
        rpc(
            &self.runtime,
            "UpdateContainerResources",
            self.runtime_service.update_container_resources(request),
        )?;
        Ok(())
    }

    pub fn stop_container(
        &mut self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<(), CriError> {
        let request = StopContainerRequest {
            container_id: container_id.to_string(),
            timeout: timeout.as_secs() as i64,
        };
        rpc(
            &self.runtime,
            "StopContainer",
            self.runtime_service.stop_container(request),
        )?;
        Ok(())
    }

    pub fn remove_container(&mut self, container_id: &str) -> Result<(), CriError> {
        let request = RemoveContainerRequest {
            container_id: container_id.to_string(),
        };
        rpc(
            &self.runtime,
            "RemoveContainer",
            self.runtime_service.remove_container(request),
        )?;
        Ok(())
    }

    pub fn list_containers(&mut self) -> Result<Vec<Container>, CriError> {
        let response = rpc(
            &self.runtime,
            "ListContainers",
            self.runtime_service
                .list_containers(ListContainersRequest { filter: None }),
        )?;
        Ok(response.containers)
    }

    pub fn container_status(&mut self, container_id: &str) -> Result<ContainerStatus, CriError> {
        let request = k8s_cri::v1::ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        };
        let response = rpc(
            &self.runtime,
            "ContainerStatus",
            self.runtime_service.container_status(request),
        )?;
        response.status.ok_or(CriError::MissingField {
            call: "ContainerStatus",
            field: "status",
        })
    }

    /// Runs `command` in a running container and waits for it.
    pub fn exec_sync(
        &mut self,
        container_id: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, CriError> {
        let request = ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: command.iter().map(|arg| arg.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        };
        let response = rpc(
            &self.runtime,
            "ExecSync",
            self.runtime_service.exec_sync(request),
        )?;
        Ok(ExecOutput {
            exit_code: response.exit_code,
            stdout: String::from_utf8_lossy(&response.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&response.stderr).into_owned(),
        })
    }
}

/// Runs one CRI call to completion on the client's runtime.
fn rpc<R>(
    runtime: &tokio::runtime::Runtime,
    call: &'static str,
    request: impl std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
) -> Result<R, CriError> {
    runtime
        .block_on(request)
        .map(tonic::Response::into_inner)
        .map_err(|status| CriError::Rpc { call, status })
}

/// A pod sandbox config as kubelet would send it, reduced to what matters
/// here: identity, a log directory, and the cgroup parent (so the harness
/// can find and remove every cgroup the pod made).
pub fn pod_sandbox_config(
    name: &str,
    log_directory: &Path,
    cgroup_parent: &str,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("{name}-uid"),
            namespace: "podbox-test".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_directory.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config running `command` from `image`; its log goes to
/// `<pod log directory>/<name>.log`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|arg| arg.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}
