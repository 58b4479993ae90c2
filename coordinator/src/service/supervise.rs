//! Supervision of the driver task. The driver is the one owner of plan state: if it ends or
//! panics, the gRPC services would go on answering while no plan ever moves again. Its
//! supervisor keeps the task's `JoinHandle`, turns its end into a reason (with the panic's
//! message), logs it, and [`Coordinator::serve`](super::Coordinator::serve) returns that reason
//! as an error, so `sanctum-coordinator serve` exits non-zero and a process supervisor restarts
//! it.
//!
//! A restart is safe: `state/runs.json` is written atomically before a run is announced, models
//! are content-addressed, and the audit log is append-only with a torn last line tolerated. The
//! plan that was running is lost (it shows as started without an end in the audit log, and its
//! nodes see their stream close); resuming it is issue 12's work.

use std::any::Any;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the driver task ended, once it has; cheap to clone (one per [`super::Coordinator`] handle).
#[derive(Clone, Debug)]
pub(super) struct DriverWatch {
    /// `None` while the driver runs; the reason once its supervisor saw it end.
    ended: watch::Receiver<Option<String>>,
}

/// Spawns the supervisor of `task` (the driver's handle) and returns what it reports to.
pub(super) fn supervise(task: JoinHandle<()>) -> DriverWatch {
    let (tx, ended) = watch::channel(None);
    tokio::spawn(async move {
        let reason = match task.await {
            Ok(()) => "the driver task ended: its event channel closed".to_string(),
            Err(e) if e.is_panic() => format!("the driver task panicked: {}", panic_message(e.into_panic().as_ref())),
            Err(e) => format!("the driver task was cancelled: {e}"),
        };
        tracing::error!(
            "{reason}; no plan can move any more, so the coordinator stops (a restart loses the running plan)"
        );
        let _ = tx.send(Some(reason));
    });
    DriverWatch { ended }
}

impl DriverWatch {
    /// Resolves with the reason once the driver task has ended; pending while it runs.
    pub(super) async fn ended(&self) -> String {
        let mut ended = self.ended.clone();
        match ended.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The supervisor itself went away without a word: only when the runtime shuts down.
            Err(_) => "the driver task's supervisor stopped (the runtime is shutting down)".to_string(),
        }
    }
}

/// The text a panic was raised with (`panic!("…")` carries a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_panic_or_an_end_of_the_task_is_reported_with_its_reason() {
        let panicked = supervise(tokio::spawn(async { panic!("overflow when adding duration to instant") }));
        let reason = tokio::time::timeout(Duration::from_secs(5), panicked.ended()).await.unwrap();
        assert_eq!(reason, "the driver task panicked: overflow when adding duration to instant");

        let n = 7;
        let formatted = supervise(tokio::spawn(async move { panic!("index {n} out of range") }));
        let reason = tokio::time::timeout(Duration::from_secs(5), formatted.ended()).await.unwrap();
        assert!(reason.ends_with("index 7 out of range"), "{reason}");

        let returned = supervise(tokio::spawn(async {}));
        let reason = tokio::time::timeout(Duration::from_secs(5), returned.ended()).await.unwrap();
        assert!(reason.contains("ended"), "{reason}");
    }

    /// A coordinator on a fresh state directory, with a certificate from a throw-away CA.
    fn coordinator(dir: &std::path::Path) -> (super::super::Coordinator, sanctum_protocol::tls::TlsMaterial) {
        use sanctum_protocol::pki::{self, Role, SignSpec};
        let ca = pki::init_ca("supervision", 1).unwrap();
        let hosts = ["localhost".to_string()];
        let spec = SignSpec { name: "coordinator", role: Role::Coordinator, days: 1, hosts: &hosts };
        let cert = pki::issue(&ca.cert_pem, &ca.key_pem, &spec).unwrap();
        let material =
            sanctum_protocol::tls::TlsMaterial::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap();
        let options = super::super::CoordinatorOptions {
            state_dir: dir.to_path_buf(),
            evaluation_deadline: Duration::from_secs(5),
            revocation_list: None,
            limits: crate::config::Limits::default(),
            store: crate::db::StoreConfig::default(),
            #[cfg(feature = "fault-injection")]
            faults: crate::faults::FaultOptions::default(),
        };
        (super::super::Coordinator::start(options, &material).unwrap(), material)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_returns_the_drivers_panic_as_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut coordinator, material) = coordinator(dir.path());
        // The real driver is running: serve goes on until its shutdown.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = coordinator.serve(listener, &material, tokio::time::sleep(Duration::from_millis(300))).await;
        assert!(served.is_ok(), "{served:?}");
        // In place of the driver, a task that panics as the driver did on a deadline of 2⁶³ s
        // (`Instant + Duration` overflow) before plan limits.
        coordinator.driver = supervise(tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("overflow when adding duration to instant")
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            coordinator.serve(listener, &material, std::future::pending::<()>()),
        )
        .await
        .expect("serve returns when the driver ends, without a shutdown signal");
        let e = served.expect_err("a driver panic is an error of serve").to_string();
        assert_eq!(
            e,
            "the driver task panicked: overflow when adding duration to instant; the coordinator stopped serving"
        );
    }

    #[tokio::test]
    async fn a_running_driver_is_not_reported() {
        let (_keep, rx) = tokio::sync::oneshot::channel::<()>();
        let running = supervise(tokio::spawn(async move {
            let _ = rx.await;
        }));
        assert!(tokio::time::timeout(Duration::from_millis(200), running.ended()).await.is_err());
    }
}
