//! The enrichment worker: claims due `fetch_message` jobs under a lease, asks
//! Qualia's `messages` query once for the whole batch, stores what it finds
//! and reschedules the rest.
//!
//! One step is one function with an outcome (`Worker::step`); the loop around
//! it only waits and repeats, so tests drive steps one by one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::config::WorkerSettings;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::qualia::{QualiaClient, QualiaError, QualiaMessage};
use crate::store::{JobOutcome, JobRecord, MessageRecord, Store, StoreError, now_ms};

/// Exponential backoff with full jitter: before retry `n` (1-based), wait a
/// random time in `[0, min(cap, base * 2^(n-1))]`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub max_attempts: u32,
}

impl RetryPolicy {
    pub fn from_settings(s: &WorkerSettings) -> Self {
        RetryPolicy {
            base: s.retry_base,
            cap: s.retry_cap,
            max_attempts: s.max_attempts,
        }
    }

    /// The upper bound of the wait before retry `n`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(30));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry `n`, given a jitter in `[0, 1]`.
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        self.ceiling(n).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// What the rest of the service can see of the worker, and the metrics it
/// keeps.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    running: AtomicBool,
    paused: AtomicBool,
    calls: AtomicU64,
    metrics: Arc<Metrics>,
}

impl WorkerStatus {
    /// A status whose worker records into these metrics.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        WorkerStatus {
            metrics,
            ..Default::default()
        }
    }

    /// `off` (no worker in this process), `running` or `paused` (Qualia
    /// refused the credentials).
    pub fn state(&self) -> &'static str {
        if !self.running.load(Ordering::Relaxed) {
            "off"
        } else if self.paused.load(Ordering::Relaxed) {
            "paused"
        } else {
            "running"
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Qualia calls made by this process's worker.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No job was due.
    Idle,
    /// One Qualia call answered; the claimed jobs were finished.
    Completed {
        done: usize,
        retried: usize,
        dead: usize,
    },
    /// The Qualia call failed; every claimed job was rescheduled. Wait
    /// `hold` before the next call.
    CallFailed {
        class: &'static str,
        jobs: usize,
        hold: Duration,
    },
    /// Qualia refused the credentials: the jobs were released untouched and
    /// the worker holds off for `hold`.
    Paused { jobs: usize, hold: Duration },
}

pub struct Worker {
    store: Arc<dyn Store>,
    client: QualiaClient,
    settings: WorkerSettings,
    policy: RetryPolicy,
    status: Arc<WorkerStatus>,
    wake: Arc<Notify>,
    /// Consecutive failed calls / auth refusals, for the worker's own hold.
    failures: u32,
    pauses: u32,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        client: QualiaClient,
        settings: WorkerSettings,
        status: Arc<WorkerStatus>,
        wake: Arc<Notify>,
    ) -> Self {
        let policy = RetryPolicy::from_settings(&settings);
        Worker {
            store,
            client,
            settings,
            policy,
            status,
            wake,
            failures: 0,
            pauses: 0,
        }
    }

    fn reschedule(
        &self,
        job: &JobRecord,
        now: i64,
        at_least: Duration,
        error: String,
    ) -> JobOutcome {
        let wait = self
            .policy
            .delay(job.attempts + 1, fastrand::f64())
            .max(at_least);
        JobOutcome::Retry {
            job: job.clone(),
            next_attempt_ms: now + wait.as_millis() as i64,
            error,
            count_attempt: true,
        }
    }

    /// A retry, or death once the attempts are spent.
    fn retry_or_dead(&self, job: &JobRecord, now: i64, error: String) -> JobOutcome {
        if job.attempts + 1 >= self.policy.max_attempts {
            JobOutcome::Dead {
                job: job.clone(),
                error,
            }
        } else {
            self.reschedule(job, now, Duration::ZERO, error)
        }
    }

    /// Claims due jobs, makes one Qualia call for all of them, records the
    /// outcomes.
    #[tracing::instrument(name = "worker_step", skip(self), err)]
    pub async fn step(&mut self) -> Result<Step, StoreError> {
        let now = now_ms();
        let claim = match self
            .store
            .claim_jobs(now, self.settings.lease, self.settings.batch_size)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.status.metrics.store_error("claim_jobs");
                return Err(e);
            }
        };
        if claim.jobs.is_empty() {
            return Ok(Step::Idle);
        }
        self.status.calls.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let answer = self.client.messages().await;
        let metrics = &self.status.metrics;
        metrics
            .qualia_call_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(e) => e.class(),
        };
        metrics
            .qualia_calls
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        let now = now_ms();
        let jobs = claim.jobs.len();

        let (outcomes, step) = match answer {
            Ok(messages) => {
                self.failures = 0;
                self.resume();
                let (outcomes, step) = self.match_messages(&claim.jobs, &messages, now);
                (outcomes, step)
            }
            Err(QualiaError::Auth { status }) => {
                self.pauses += 1;
                let hold = self.policy.ceiling(self.pauses);
                if !self.status.paused.swap(true, Ordering::Relaxed)
                    || self.pauses.is_multiple_of(10)
                {
                    tracing::error!(
                        status,
                        url = self.client.url(),
                        retry_in_s = hold.as_secs_f64(),
                        "QUALIA REFUSED THE API CREDENTIALS: enrichment is paused, jobs wait; \
                         check QUALIA_API_USERNAME/QUALIA_API_PASSWORD (or QUALIA_API_TOKEN) \
                         and QUALIA_ENVIRONMENT"
                    );
                }
                let error = format!("auth: Qualia answered HTTP {status}");
                let outcomes = claim
                    .jobs
                    .iter()
                    .map(|job| JobOutcome::Retry {
                        job: job.clone(),
                        next_attempt_ms: now,
                        error: error.clone(),
                        count_attempt: false,
                    })
                    .collect();
                (outcomes, Step::Paused { jobs, hold })
            }
            Err(e) => {
                self.resume();
                self.failures += 1;
                let class = e.class();
                let error = format!("{class}: {e}");
                let (outcomes, hold): (Vec<_>, Duration) = match &e {
                    // Qualia's trouble, not the job's: retried until it clears,
                    // at most RETRY_CAP apart, never dead.
                    QualiaError::RateLimited { retry_after } => {
                        let at_least = retry_after.unwrap_or(Duration::ZERO);
                        let outcomes = claim
                            .jobs
                            .iter()
                            .map(|job| self.reschedule(job, now, at_least, error.clone()))
                            .collect();
                        let hold = at_least.max(self.policy.delay(self.failures, fastrand::f64()));
                        (outcomes, hold)
                    }
                    QualiaError::Retryable(_) => {
                        let outcomes = claim
                            .jobs
                            .iter()
                            .map(|job| self.reschedule(job, now, Duration::ZERO, error.clone()))
                            .collect();
                        (outcomes, self.policy.delay(self.failures, fastrand::f64()))
                    }
                    // The query itself is refused: counts toward death.
                    QualiaError::Permanent(_) | QualiaError::Auth { .. } => {
                        let outcomes = claim
                            .jobs
                            .iter()
                            .map(|job| self.retry_or_dead(job, now, error.clone()))
                            .collect();
                        (outcomes, self.policy.delay(self.failures, fastrand::f64()))
                    }
                };
                tracing::warn!(class, jobs, hold_s = hold.as_secs_f64(), error = %e, "Qualia call failed; jobs rescheduled");
                (outcomes, Step::CallFailed { class, jobs, hold })
            }
        };
        let counted = |o: &JobOutcome| match o {
            JobOutcome::Done { .. } => "done",
            JobOutcome::Retry { .. } => "retried",
            JobOutcome::Dead { .. } => "dead",
        };
        let tally: Vec<&'static str> = outcomes.iter().map(counted).collect();
        if let Err(e) = self.store.finish_jobs(&claim.token, now, outcomes).await {
            self.status.metrics.store_error("finish_jobs");
            return Err(e);
        }
        for outcome in tally {
            self.status
                .metrics
                .jobs_finished
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.to_owned(),
                })
                .inc();
        }
        self.status
            .metrics
            .worker_paused
            .set(i64::from(self.status.is_paused()));
        if let Step::Completed {
            done,
            retried,
            dead,
        } = &step
        {
            tracing::info!(done, retried, dead, "enrichment batch finished");
        }
        Ok(step)
    }

    fn resume(&mut self) {
        if self.status.paused.swap(false, Ordering::Relaxed) {
            tracing::info!("Qualia accepts the API credentials again: enrichment resumed");
        }
        self.pauses = 0;
    }

    fn match_messages(
        &self,
        jobs: &[JobRecord],
        messages: &[QualiaMessage],
        now: i64,
    ) -> (Vec<JobOutcome>, Step) {
        let by_id: HashMap<&str, &QualiaMessage> = messages
            .iter()
            .map(|m| (m.message_id.as_str(), m))
            .collect();
        let (mut done, mut retried, mut dead) = (0, 0, 0);
        let outcomes = jobs
            .iter()
            .map(|job| {
                let found = job
                    .message_id
                    .as_ref()
                    .and_then(|id| by_id.get(id.as_ref()).map(|m| (id, *m)));
                let outcome = match found {
                    Some((message_id, m)) => JobOutcome::Done {
                        job: job.clone(),
                        message: MessageRecord {
                            order_id: job.order_id.clone(),
                            message_id: message_id.clone(),
                            order_number: m.order_number.clone(),
                            from_name: m.from_name.clone(),
                            text: m.text.clone(),
                            created_date: m.created_date.clone(),
                            read: m.read,
                            attachments: m.attachments.clone(),
                            stored_ms: now,
                        },
                    },
                    None => self.retry_or_dead(
                        job,
                        now,
                        format!(
                            "not_found: message {} is not in Qualia's answer (attempt {})",
                            job.message_id
                                .as_ref()
                                .map(|m| m.as_ref())
                                .unwrap_or("(none)"),
                            job.attempts + 1
                        ),
                    ),
                };
                match &outcome {
                    JobOutcome::Done { .. } => done += 1,
                    JobOutcome::Retry { .. } => retried += 1,
                    JobOutcome::Dead { .. } => dead += 1,
                }
                outcome
            })
            .collect();
        (
            outcomes,
            Step::Completed {
                done,
                retried,
                dead,
            },
        )
    }

    /// Runs steps until `shutdown` turns true; finishes the step under way.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.status.running.store(true, Ordering::Relaxed);
        tracing::info!(
            url = self.client.url(),
            batch_size = self.settings.batch_size,
            "enrichment worker started"
        );
        loop {
            if *shutdown.borrow() {
                break;
            }
            let hold = match self.step().await {
                Ok(Step::Idle) => {
                    tokio::select! {
                        () = self.wake.notified() => self.settings.batch_window,
                        () = tokio::time::sleep(self.settings.poll_interval) => Duration::ZERO,
                        _ = shutdown.changed() => break,
                    }
                }
                Ok(Step::Completed { .. }) => Duration::ZERO,
                Ok(Step::CallFailed { hold, .. } | Step::Paused { hold, .. }) => hold,
                Err(e) => {
                    tracing::error!(error = %crate::http::error::chain(&e), "worker cannot reach the store");
                    self.settings.poll_interval
                }
            };
            if !hold.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(hold) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        self.status.running.store(false, Ordering::Relaxed);
        tracing::info!("enrichment worker stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_attempts: 12,
        };
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(1000), Duration::from_secs(300));
        assert_eq!(p.delay(4, 0.0), Duration::ZERO);
        assert_eq!(p.delay(4, 0.5), Duration::from_secs(4));
        assert_eq!(p.delay(4, 7.0), Duration::from_secs(8), "jitter is clamped");
    }
}
