//! Tiny OCI images built locally from Debian's static busybox, because no
//! image registry is reachable from the test machines.
//!
//! One tarball in OCI image-layout form holds two images that share one
//! uncompressed layer (busybox and a symlink per applet): [`BUSYBOX_IMAGE`]
//! (runs `/bin/sh`) and [`PAUSE_IMAGE`] (sleeps for ever, the CRI plugin's
//! `sandbox_image`). `ctr image import` takes it as is: each index entry is
//! annotated with `io.containerd.image.name`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The busybox image: `/bin/sh` by default, every busybox applet in /bin.
pub const BUSYBOX_IMAGE: &str = "docker.io/podbox/busybox:test";
/// The pod sandbox ("pause") image: sleeps until killed.
pub const PAUSE_IMAGE: &str = "docker.io/podbox/pause:test";

const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Longer than any test; `sleep` as PID 1 ignores SIGTERM, so CRI's SIGKILL ends it.
const PAUSE_SECONDS: &str = "2147483647";

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("running `{program} --list` to enumerate busybox applets: {source}")]
    BusyboxList {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("`{program} --list` failed ({status}); is it Debian's busybox-static?")]
    BusyboxListFailed {
        program: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the tar entry {entry}: {source}")]
    Tar {
        entry: String,
        source: std::io::Error,
    },
}

/// A content-addressed blob of the image layout.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
        Blob { digest, bytes }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.bytes.len() })
    }
}

/// Writes the OCI image-layout tarball with [`BUSYBOX_IMAGE`] and
/// [`PAUSE_IMAGE`] to `dest`, built from the static busybox at `busybox`.
pub fn write_test_images(busybox: &Path, dest: &Path) -> Result<(), ImageError> {
    let layer = Blob::new(busybox_layer(busybox)?);
    let mut blobs = Vec::new();
    let mut index_entries = Vec::new();
    for (name, command) in [
        (BUSYBOX_IMAGE, vec!["/bin/sh"]),
        (PAUSE_IMAGE, vec!["/bin/sleep", PAUSE_SECONDS]),
    ] {
        let config = Blob::new(json_bytes(&json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": command,
                "WorkingDir": "/",
            },
            // The diff id of an uncompressed layer is its digest.
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        })));
        let manifest = Blob::new(json_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.descriptor(MEDIA_TYPE_CONFIG),
            "layers": [layer.descriptor(MEDIA_TYPE_LAYER)],
        })));
        let mut entry = manifest.descriptor(MEDIA_TYPE_MANIFEST);
        entry["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        entry["annotations"] = json!({
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap_or("latest"),
        });
        index_entries.push(entry);
        blobs.push(config);
        blobs.push(manifest);
    }
    blobs.push(layer);
    let index = json!({ "schemaVersion": 2, "manifests": index_entries });

    let mut tarball = tar::Builder::new(Vec::new());
    append_file(
        &mut tarball,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    append_file(&mut tarball, "index.json", &json_bytes(&index), 0o644)?;
    append_dir(&mut tarball, "blobs", 0o755)?;
    append_dir(&mut tarball, "blobs/sha256", 0o755)?;
    for blob in &blobs {
        let hex = blob.digest.trim_start_matches("sha256:");
        append_file(
            &mut tarball,
            &format!("blobs/sha256/{hex}"),
            &blob.bytes,
            0o644,
        )?;
    }
    let bytes = finish(tarball)?;
    std::fs::write(dest, bytes).map_err(|source| ImageError::Write {
        path: dest.to_path_buf(),
        source,
    })
}

/// The one layer: the usual top-level directories, /bin/busybox and a
/// symlink per applet, and a passwd/group naming root.
fn busybox_layer(busybox: &Path) -> Result<Vec<u8>, ImageError> {
    let binary = std::fs::read(busybox).map_err(|source| ImageError::Read {
        path: busybox.to_path_buf(),
        source,
    })?;
    let listing = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|source| ImageError::BusyboxList {
            program: busybox.to_path_buf(),
            source,
        })?;
    if !listing.status.success() {
        return Err(ImageError::BusyboxListFailed {
            program: busybox.to_path_buf(),
            status: listing.status,
        });
    }
    let applets = String::from_utf8_lossy(&listing.stdout);

    let mut layer = tar::Builder::new(Vec::new());
    for dir in [
        "bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin", "var",
    ] {
        append_dir(&mut layer, dir, 0o755)?;
    }
    append_dir(&mut layer, "tmp", 0o1777)?;
    append_file(&mut layer, "bin/busybox", &binary, 0o755)?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        append_symlink(&mut layer, &format!("bin/{applet}"), "busybox")?;
    }
    append_file(
        &mut layer,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    append_file(&mut layer, "etc/group", b"root:x:0:\n", 0o644)?;
    finish(layer)
}

fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    // Serialising a Value built by json! cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A header with everything fixed (owner root, mtime 0) so that the same
/// busybox always gives the same digests.
fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
) -> Result<(), ImageError> {
    let mut header = header(tar::EntryType::Directory, mode, 0);
    builder
        .append_data(&mut header, format!("{path}/"), std::io::empty())
        .map_err(|source| ImageError::Tar {
            entry: path.to_string(),
            source,
        })
}

fn append_file(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), ImageError> {
    let mut header = header(tar::EntryType::Regular, mode, contents.len() as u64);
    builder
        .append_data(&mut header, path, contents)
        .map_err(|source| ImageError::Tar {
            entry: path.to_string(),
            source,
        })
}

fn append_symlink(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    target: &str,
) -> Result<(), ImageError> {
    let mut header = header(tar::EntryType::Symlink, 0o777, 0);
    builder
        .append_link(&mut header, path, target)
        .map_err(|source| ImageError::Tar {
            entry: path.to_string(),
            source,
        })
}

fn finish(builder: tar::Builder<Vec<u8>>) -> Result<Vec<u8>, ImageError> {
    builder.into_inner().map_err(|source| ImageError::Tar {
        entry: "end of archive".to_string(),
        source,
    })
}
