//! Starting a coordinator: the revocation list, the state directory, the signed audit log and the
//! store, with what the store remembers of earlier runs and nodes; then the driver task. What a
//! restart resumes is the driver's (`driver/restore.rs`).

use super::*;

/// Why a coordinator did not start; nothing was served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured revocation list cannot be read or parsed: running without it would admit
    /// every revoked certificate.
    #[error(transparent)]
    RevocationList(#[from] RevocationListError),
    #[error("cannot open the state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AuditLog(#[from] sanctum_protocol::audit::AuditError),
    #[error(transparent)]
    Store(#[from] crate::db::DbError),
}

impl Coordinator {
    /// Opens the state directory and the audit log (signed with a key bound to `material`'s
    /// certificate) and starts the driver task.
    pub fn start(options: CoordinatorOptions, material: &TlsMaterial) -> Result<Self, StartError> {
        // A configured revocation list that cannot be read or parsed stops the start, before
        // anything is opened: running without it would admit every revoked certificate.
        let revocations = match &options.revocation_list {
            Some(path) => {
                let (text, list) = revocation::load(path)?;
                Some((path.clone(), text, list))
            }
            None => None,
        };
        let store = Store::open(&options.state_dir)
            .map_err(|source| StartError::StateDir { path: options.state_dir.clone(), source })?;
        let audit = AuditLog::open_for(&options.state_dir.join("audit"), material)?;
        let (events, rx) = mpsc::channel(EVENTS_QUEUE);
        let (plan_events, _) = broadcast::channel(1024);
        let db = durable::Durable::open(&options.store, &options.state_dir)?;
        let rows = db.call(|s| s.runs())?;
        let runs = RunRegistry::from_rows(&rows);
        // Every node seen before this start, for `nodes list` (not connected until it calls).
        let seen: HashMap<NodeName, crate::status::NodeSeen> = db
            .call(|s| s.nodes())?
            .into_iter()
            .map(|n| {
                let s =
                    crate::status::NodeSeen { version: n.version, device: n.device, last_seen_unix_ms: n.last_seen_ms };
                (n.name, s)
            })
            .collect();
        let mut plans = Vec::new();
        for row in &rows {
            let run_id = row.run_id.clone();
            let rounds = db.call(move |s| s.rounds(&run_id))?;
            plans.push(proto::PlanSummary {
                plan_id: row.plan_id.to_string(),
                run: row.run_id.to_string(),
                run_number: row.number,
                name: row.name.clone(),
                status: row.status.as_str().into(),
                rounds_planned: row.rounds_planned,
                rounds_completed: rounds.last().map_or(0, |r| r.round),
                final_model_sha256: row.final_model.clone().unwrap_or_default(),
                reason: row.reason.clone(),
                started_unix_ms: row.submitted_ms,
                finished_unix_ms: row.finished_ms.unwrap_or(0),
                ..Default::default()
            });
        }
        let inner = Arc::new(Inner {
            limits: options.limits.clone(),
            #[cfg(feature = "fault-injection")]
            faults: options.faults.clone(),
            events,
            nodes: Mutex::new(HashMap::new()),
            rounds: RwLock::new(HashMap::new()),
            plan_events,
            history: Mutex::new(History::new(options.limits.events_per_run, options.limits.runs_in_memory)),
            runs: Mutex::new(runs),
            db,
            store,
            next_conn: AtomicU64::new(1),
            audit: Mutex::new(audit),
            audit_quota: Mutex::new(quota::AuditQuota::new(Duration::from_secs(options.limits.refusal_report_secs))),
            revoked: Arc::new(tls::Revocations::default()),
            plans: Mutex::new(plans),
            receipts: Mutex::new(crate::receipts::Awaiting::default()),
            fetch_streams: Mutex::new(HashMap::new()),
            seen: Mutex::new(seen),
            heartbeats: Mutex::new(HashMap::new()),
            node_rows: Mutex::new(quota::NodeRowWrites::default()),
            metrics: crate::metrics::Metrics::new(),
            decode_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            )),
        });
        if let Some((path, text, list)) = revocations {
            inner.apply_revocations(list);
            tokio::spawn(follow_revocations(inner.clone(), path, text));
        }
        // The robust aggregators' round buffers: what an earlier process kept is removed (its
        // rounds run again from their start).
        let robust_dir = options.state_dir.join("spool").join("robust");
        let buffers = crate::robust_spool::FileRoundBuffers::open(&robust_dir)
            .map_err(|source| StartError::StateDir { path: robust_dir.clone(), source })?;
        let driver = Driver::new(inner.clone(), options.evaluation_deadline, Box::new(buffers));
        let driver = supervise::supervise(tokio::spawn(driver.run(rx)));
        Ok(Self { inner, driver })
    }
}

impl Coordinator {
    /// Serves the read-only status page and the metrics of `[status]` on their own listener
    /// (`crate::web`), behind this coordinator's mutual TLS (`material`) when `tls = true`;
    /// returns the address bound. Refusals on a mutual-TLS status listener are written to the
    /// audit log at most once per `limits.refusal_report_secs`, as the gRPC listener's are.
    pub async fn serve_status(
        &self,
        cfg: &crate::config::StatusConfig,
        material: &tls::TlsMaterial,
    ) -> Result<std::net::SocketAddr, StatusError> {
        let tls = if cfg.tls {
            let period = std::time::Duration::from_secs(self.inner.limits.refusal_report_secs);
            let config = material.https_server_config().map_err(StatusError::Tls)?;
            let refusals = Arc::new(tls::Refusals::new(period));
            // Lives as long as the process, as the status listener does.
            super::transport::spawn_refusal_reporter(&self.inner, &refusals, period);
            Some(crate::web::StatusTls {
                config,
                revoked: Arc::clone(&self.inner.revoked),
                refusals,
                // A refused request of a member is audited with who it was, as a refused gRPC call.
                on_itemised: Some(super::transport::refusal_hook(&self.inner)),
            })
        } else {
            None
        };
        crate::web::start(cfg, Arc::new(self.clone()), tls).await.map_err(StatusError::Web)
    }
}

/// Why the status listener did not start.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Web(crate::web::WebError),
    #[error("the status page's mutual TLS (status.tls = true): {0}")]
    Tls(tls::TlsError),
}
