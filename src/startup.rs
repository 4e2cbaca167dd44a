//! Builds the application in one place, for `main` and for tests alike.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::config::Settings;
use crate::http::serve::{ServeOptions, serve};
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::qualia::QualiaClient;
use crate::store::{self, Store};
use crate::worker::{Worker, WorkerStatus};

/// A bound, ready-to-serve instance.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    store: Arc<dyn Store>,
    worker: Option<Worker>,
    serve_options: ServeOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("Qualia API client: {0}")]
    Qualia(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Application {
    /// Opens the store and binds the listener (port 0 picks a free port).
    pub async fn build(settings: &Settings) -> Result<Self, StartError> {
        let store = store::open(&settings.store, settings.quarantine_max).await?;
        Self::with_store(settings, store).await
    }

    /// As `build`, on a store opened by the caller.
    pub async fn with_store(
        settings: &Settings,
        store: Arc<dyn Store>,
    ) -> Result<Self, StartError> {
        let bind = |source| StartError::Bind {
            addr: settings.bind,
            source,
        };
        let listener = TcpListener::bind(settings.bind).await.map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(WorkerStatus::with_metrics(Arc::clone(&metrics)));
        let wake = Arc::new(Notify::new());
        let worker = if settings.worker.enabled {
            build_worker(
                settings,
                Arc::clone(&store),
                Arc::clone(&status),
                Arc::clone(&wake),
            )?
        } else {
            None
        };
        let state = AppState::new(settings, Arc::clone(&store), status, wake, metrics);
        Ok(Application {
            listener,
            local_addr,
            state,
            store,
            worker,
            serve_options: ServeOptions {
                header_timeout: settings.header_timeout,
                max_connections: settings.max_connections as usize,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests finish, and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_worker, worker_stopped) = watch::channel(false);
        let worker = self.worker.map(|w| tokio::spawn(w.run(worker_stopped)));
        let app = router(self.state);
        let served = serve(self.listener, app, self.serve_options, shutdown).await;
        let _ = stop_worker.send(true);
        if let Some(w) = worker {
            let _ = w.await;
        }
        self.store.close().await;
        served
    }
}

/// The enrichment worker the settings ask for: `None` without Qualia
/// credentials (said once, loudly enough: jobs wait).
pub fn build_worker(
    settings: &Settings,
    store: Arc<dyn Store>,
    status: Arc<WorkerStatus>,
    wake: Arc<Notify>,
) -> Result<Option<Worker>, StartError> {
    match QualiaClient::new(&settings.qualia).map_err(StartError::Qualia)? {
        Some(client) => Ok(Some(Worker::new(
            store,
            client,
            settings.worker.clone(),
            status,
            wake,
        ))),
        None => {
            tracing::warn!(
                "no Qualia API credentials (QUALIA_API_USERNAME/QUALIA_API_PASSWORD or \
                 QUALIA_API_TOKEN): message enrichment is off; message jobs are kept and wait"
            );
            Ok(None)
        }
    }
}

/// Runs only the enrichment worker (no HTTP) until `shutdown` resolves.
pub async fn run_worker_only(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let store = store::open(&settings.store, settings.quarantine_max).await?;
    let status = Arc::new(WorkerStatus::default());
    let worker = build_worker(
        settings,
        Arc::clone(&store),
        status,
        Arc::new(Notify::new()),
    )?;
    let Some(worker) = worker else {
        store.close().await;
        return Err(StartError::Qualia(
            "--no-http runs only the worker, which needs Qualia API credentials".into(),
        ));
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(worker.run(stopped));
    shutdown.await;
    let _ = stop.send(true);
    let _ = task.await;
    store.close().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
