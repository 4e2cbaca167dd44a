//! The HTTP/1.1 server loop: a bound on open connections, a deadline on
//! request headers, graceful drain.
//!
//! The header deadline is kept per connection rather than per request:
//! hyper's own `header_read_timeout` arms (and allocates) a timer for every
//! request, which cost about 15% of ingest throughput (docs/performance.md).
//! Here each connection records, in one atomic, since when it has been
//! waiting for request headers (or that a request is being served), and one
//! watchdog timer per connection wakes at most once per `header_timeout` to
//! check it. A client that opens a connection and stalls, drips its headers,
//! or leaves a keep-alive connection idle is disconnected after
//! `header_timeout`; a request whose handler is still working is not.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long in-flight requests get to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// At most one "connection limit reached" warning per this period.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How the server treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection waiting longer than this for request headers is closed.
    pub header_timeout: Duration,
    /// Most connections served at once; more wait in the listen queue.
    pub max_connections: usize,
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
/// accepting and lets open connections finish their requests (at most
/// `DRAIN_TIMEOUT`).
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut last_warning: Option<Instant> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        if slots.available_permits() == 0
            && last_warning.is_none_or(|t| t.elapsed() >= LIMIT_WARNING_EVERY)
        {
            last_warning = Some(Instant::now());
            tracing::warn!(
                max_connections = options.max_connections,
                "connection limit reached: new connections wait in the listen queue \
                 (MAX_CONNECTIONS)"
            );
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let watch = Arc::new(HeaderWatch::new());
        let service = Tracked {
            inner: TowerToHyperService::new(app.clone()),
            watch: Arc::clone(&watch),
        };
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let header_timeout = options.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                },
                () = watch.overdue(header_timeout) => {
                    tracing::debug!("no request headers within HEADER_TIMEOUT; connection closed");
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("connections still open after {}s; stopping anyway", DRAIN_TIMEOUT.as_secs());
        }
    }
    Ok(())
}

/// Since when (milliseconds after `epoch`) a connection has been waiting for
/// request headers, or `BUSY` while one of its requests is being served.
struct HeaderWatch {
    epoch: Instant,
    waiting_since_ms: AtomicU64,
}

const BUSY: u64 = u64::MAX;

impl HeaderWatch {
    fn new() -> Self {
        HeaderWatch {
            epoch: Instant::now(),
            waiting_since_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn busy(&self) {
        self.waiting_since_ms.store(BUSY, Ordering::Relaxed);
    }

    fn waiting(&self) {
        self.waiting_since_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// How long until the connection's headers are overdue; `None` if they
    /// already are.
    fn remaining(&self, timeout: Duration) -> Option<Duration> {
        let since = self.waiting_since_ms.load(Ordering::Relaxed);
        if since == BUSY {
            return Some(timeout);
        }
        let waited = Duration::from_millis(self.elapsed_ms().saturating_sub(since));
        timeout.checked_sub(waited).filter(|d| !d.is_zero())
    }

    /// Resolves once the connection has waited `timeout` for headers.
    async fn overdue(&self, timeout: Duration) {
        let mut wait = timeout;
        loop {
            tokio::time::sleep(wait).await;
            match self.remaining(timeout) {
                None => return,
                Some(d) => wait = d.max(Duration::from_millis(10)),
            }
        }
    }
}

/// The app, marking its connection busy from a request's headers until its
/// answer.
struct Tracked<S> {
    inner: S,
    watch: Arc<HeaderWatch>,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: R) -> Self::Future {
        self.watch.busy();
        TrackedFuture {
            inner: self.inner.call(req),
            watch: Arc::clone(&self.watch),
        }
    }
}

pin_project_lite::pin_project! {
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        watch: Arc<HeaderWatch>,
    }
}

impl<F: Future> Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = this.inner.poll(cx);
        if out.is_ready() {
            this.watch.waiting();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_connection_is_never_overdue() {
        let w = HeaderWatch::new();
        w.busy();
        assert_eq!(
            w.remaining(Duration::from_millis(1)),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn a_waiting_connection_becomes_overdue() {
        let w = HeaderWatch::new();
        w.waiting();
        assert!(w.remaining(Duration::from_secs(60)).is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(w.remaining(Duration::from_millis(2)), None);
    }
}
