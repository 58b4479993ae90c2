//! The durable store's thread: the database ([`crate::db`]) is opened and used on one OS thread
//! of its own, with no async runtime on it (the synchronous PostgreSQL client runs its own), and
//! the driver calls it through [`Durable::call`], which blocks outside the async workers
//! (`block_in_place`), so a commit's fsync never stalls a handler.

use std::path::Path;
use std::sync::mpsc;

use crate::db::{self, DbError, StateStore, StoreConfig};

type Job = Box<dyn FnOnce(&mut dyn StateStore) + Send>;

/// A handle on the store's thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Durable {
    jobs: mpsc::Sender<Job>,
}

impl Durable {
    /// Starts the store's thread and opens (creating and migrating) the store there.
    pub(crate) fn open(cfg: &StoreConfig, state_dir: &Path) -> Result<Self, DbError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (opened, ready) = mpsc::sync_channel(1);
        let (cfg, dir) = (cfg.clone(), state_dir.to_path_buf());
        std::thread::Builder::new()
            .name("sanctum-store".into())
            .spawn(move || {
                let mut store = match db::open(&cfg, &dir) {
                    Ok(s) => {
                        let _ = opened.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                        return;
                    }
                };
                // Until every handle is dropped (the coordinator stops).
                while let Ok(job) = rx.recv() {
                    job(store.as_mut());
                }
            })
            .map_err(|e| DbError::Config(format!("cannot start the store's thread: {e}")))?;
        ready.recv().map_err(|_| DbError::Config("the store's thread ended while opening the store".into()))??;
        Ok(Self { jobs })
    }

    /// Runs `f` on the store's thread and waits for its result.
    pub(crate) fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn StateStore) -> Result<R, DbError> + Send + 'static,
    ) -> Result<R, DbError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        let gone = || DbError::Config("the store's thread is gone; restart the coordinator".into());
        self.jobs.send(job).map_err(|_| gone())?;
        let wait = || rx.recv().map_err(|_| gone());
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread { tokio::task::block_in_place(wait)? } else { wait()? }
    }
}
