//! The events the shim publishes to containerd, in publishing order.
//! Lifecycle events (create, start, exit, delete: at most a few per process
//! containerd asked for) are never dropped; OOM events, which the guest can
//! make as many of as it likes, have a bounded queue of their own that drops
//! what does not fit.

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageField;
use tokio::sync::mpsc;

use super::pod::Exit;

/// An event for containerd.
pub type EventMessage = Box<dyn Event + Send + Sync>;

/// OOM events waiting for containerd (see the module comment).
pub const OOM_EVENT_QUEUE: usize = 64;

/// Where the shim's events go.
pub struct EventSenders {
    pub lifecycle: mpsc::UnboundedSender<EventMessage>,
    pub oom: mpsc::Sender<EventMessage>,
}

impl EventSenders {
    pub fn publish(&self, event: EventMessage) {
        // The receiver lives as long as the server; a send fails only at shutdown.
        let _ = self.lifecycle.send(event);
    }

    /// An event the guest controls the rate of (OOM): dropped, and
    /// logged, when containerd is not keeping up.
    pub fn publish_droppable(&self, event: EventMessage) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.oom.try_send(event) {
            tracing::warn!("OOM event queue full; dropped {}", event.topic());
        }
    }

    pub fn publish_exit(&self, container_id: &str, exec_id: &str, pid: u32, exit: &Exit) {
        self.publish(Box::new(TaskExit {
            container_id: container_id.to_string(),
            id: if exec_id.is_empty() {
                container_id.to_string()
            } else {
                exec_id.to_string()
            },
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            ..Default::default()
        }));
    }
}

/// Publishes TaskOOM for each container id `next` yields (the agent's
/// OOM events) until it yields None. The agent is in the guest: an event
/// naming a container that is not this pod's is dropped, not passed on.
pub fn forward_oom_events(
    mut next: impl FnMut() -> Option<String>,
    is_ours: impl Fn(&str) -> bool,
    publish: impl Fn(EventMessage),
) {
    let mut ignored = 0u64;
    while let Some(container_id) = next() {
        if !is_ours(&container_id) {
            // Logged once, so a flood cannot flood the log either.
            if ignored == 0 {
                tracing::warn!(container = ?container_id, "OOM event for a container not in this pod ignored");
            }
            ignored += 1;
            continue;
        }
        tracing::warn!(container = %container_id, "OOM kill in the guest");
        publish(Box::new(TaskOOM {
            container_id,
            ..Default::default()
        }));
    }
    if ignored > 0 {
        tracing::warn!("{ignored} OOM events for containers not in this pod ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_oom_events_for_foreign_ids_publishes_none() {
        // A fake agent: 100000 OOM events naming containers of no one,
        // ids that try to look like ours, then one real one.
        let mut events = (0..100_000)
            .map(|i| match i % 3 {
                0 => format!("foreign-{i}"),
                1 => "web/../other".to_string(),
                _ => "web ".to_string(),
            })
            .chain(["web".to_string()]);
        let published = std::sync::Mutex::new(Vec::new());
        forward_oom_events(
            || events.next(),
            |id| id == "web",
            |event| {
                let topic = event.topic();
                published.lock().expect("lock").push(topic);
            },
        );
        assert_eq!(
            published.into_inner().expect("lock"),
            vec!["/tasks/oom".to_string()]
        );
    }
}
