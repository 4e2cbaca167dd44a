//! The embedded SQLite backend.
//!
//! Writes go through one writer thread that owns the only write connection.
//! It takes every write waiting in its queue, applies them in one
//! transaction and commits once: group commit (see `Batch` for how a failing
//! write is undone without losing the others). The
//! commit puts the transaction in the write-ahead log (WAL); a second thread,
//! the syncer, then flushes the WAL to the disk (`fdatasync`) and only after
//! that answers the callers of every transaction the flush covered. So the
//! writer applies the next batch while the disk is still flushing the last
//! one, many requests share one flush, and no caller hears "stored" before its
//! notification is on the disk. (This is what `synchronous=FULL` promises,
//! with the flush moved off the writer: the connection runs with
//! `synchronous=NORMAL`, under which SQLite still syncs the WAL before every
//! checkpoint and the database file after it, so a transaction that leaves the
//! WAL is durable in the database file first.)
//!
//! A third thread copies the WAL into the database file (checkpoints), so
//! that work is not done inside the writer's commits; see `Checkpointer`.
//!
//! If a flush fails, the disk may have dropped written pages, so the store
//! refuses every later write (503, `/ready` fails) until the process is
//! restarted and SQLite recovers the file.
//!
//! Reads use a small pool of read-only connections, which WAL lets run beside
//! the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    ActivityQuery, ActivityRecord, Claim, Enrichment, JobCounts, JobOutcome, JobRecord, JobState,
    MessageRecord, NewActivity, Page, QuarantineEntry, Recorded, Store, StoreError,
};
use crate::activity::{ActivityType, DedupKey, MessageId, OrderId};

/// Most writes applied in one transaction.
const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 8192;
/// Read connections kept open.
const READ_POOL: usize = 8;
/// How long a connection waits for a lock held by another process.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// When a write last failed, and why.
type FailureLog = Arc<Mutex<Option<(std::time::Instant, String)>>>;

/// How long after a failed write the store still reports itself not ready.
const FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(5);

/// Schema migrations, applied in order; `PRAGMA user_version` counts them.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE activities (
    seq              INTEGER PRIMARY KEY,
    activity_id      TEXT NOT NULL UNIQUE,
    order_id         TEXT NOT NULL,
    activity_type    TEXT NOT NULL,
    description      TEXT NOT NULL,
    message_id       TEXT,
    received_ms      INTEGER NOT NULL,
    request_id       TEXT NOT NULL,
    raw              TEXT NOT NULL,
    enrichment       TEXT NOT NULL,
    deliveries       INTEGER NOT NULL DEFAULT 1,
    last_delivery_ms INTEGER NOT NULL
);
CREATE INDEX activities_by_order ON activities(order_id, seq);
CREATE INDEX activities_by_type ON activities(activity_type, seq);
CREATE INDEX activities_by_message ON activities(order_id, message_id) WHERE message_id IS NOT NULL;

CREATE TABLE dedup (
    key         TEXT PRIMARY KEY,
    activity_id TEXT NOT NULL,
    expires_ms  INTEGER
) WITHOUT ROWID;
CREATE INDEX dedup_by_expiry ON dedup(expires_ms) WHERE expires_ms IS NOT NULL;

CREATE TABLE jobs (
    job_id          TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    order_id        TEXT NOT NULL,
    message_id      TEXT,
    activity_id     TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    lease_until_ms  INTEGER,
    lease_owner     TEXT,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX jobs_due ON jobs(state, next_attempt_ms);

CREATE TABLE messages (
    order_id     TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    order_number TEXT,
    from_name    TEXT,
    text         TEXT,
    created_date TEXT,
    read         INTEGER,
    attachments  TEXT NOT NULL,
    stored_ms    INTEGER NOT NULL,
    PRIMARY KEY (order_id, message_id)
) WITHOUT ROWID;

CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    reason      TEXT NOT NULL,
    body        BLOB NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"#,
    // 2: redeliveries are found through the order's own index (the order id and
    // a hash of the dedup key) instead of a separate table of markers: one
    // randomly placed index entry per notification instead of three, a third of
    // the bytes written (docs/performance.md). `backfill_dedup_hash` fills the
    // new column of existing rows.
    r#"
ALTER TABLE activities ADD COLUMN dedup_hash INTEGER;
DROP INDEX activities_by_order;
DROP INDEX activities_by_message;
CREATE INDEX activities_by_order ON activities(order_id, dedup_hash, seq);
DROP TABLE dedup;
"#,
];

/// One write waiting for the writer thread.
trait WriteOp: Send {
    /// Applies the write inside the current transaction; the error if it
    /// failed. May be called again in a later transaction if the first one
    /// was undone.
    fn apply(&mut self, conn: &Connection) -> Result<(), String>;
    /// Answers the caller once the transaction holding the write has ended.
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

struct Op<R, F> {
    f: F,
    result: Option<rusqlite::Result<R>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> WriteOp for Op<R, F>
where
    R: Send,
    F: FnMut(&Connection) -> rusqlite::Result<R> + Send,
{
    fn apply(&mut self, conn: &Connection) -> Result<(), String> {
        let result = (self.f)(conn);
        let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        self.result = Some(result);
        outcome
    }

    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        let out = match (self.result, commit) {
            (Some(Err(e)), _) => Err(unavailable(e)),
            (_, Err(e)) => Err(e),
            (Some(Ok(r)), Ok(())) => Ok(r),
            (None, Ok(())) => Err(StoreError::unavailable("write was not applied")),
        };
        let _ = self.reply.send(out);
    }
}

pub struct SqliteStore {
    path: PathBuf,
    writes: Mutex<Option<mpsc::Sender<Box<dyn WriteOp>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// When a write last failed, and why (for readiness).
    last_failure: FailureLog,
    quarantine_max: u64,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::unavailable(e)
}

fn open_error(path: &Path, e: impl Into<super::BoxError>) -> StoreError {
    StoreError::Open {
        location: format!("sqlite://{}", path.display()),
        source: e.into(),
    }
}

fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, WAL is required"
        )));
    }
    // NORMAL: a commit writes the WAL without syncing it; the syncer thread
    // syncs it before any caller is answered (see the module's comment).
    // Checkpoints still sync the WAL before and the database after.
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;")?;
    Ok(conn)
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database schema is version {version}, newer than this program's {}; \
             run a newer qualia-webhook",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        if i + 1 == 2 {
            backfill_dedup_hash(&tx)?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    // A real write, so an unwritable file is found now and not at the first
    // notification.
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('opened_ms', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [super::now_ms().to_string()],
    )?;
    tx.commit()
}

/// Migration 2: the dedup hash of every activity stored before it.
fn backfill_dedup_hash(conn: &Connection) -> rusqlite::Result<()> {
    let mut rows = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT seq, activity_type, order_id, description, message_id FROM activities
             WHERE dedup_hash IS NULL",
        )?;
        let mut found = stmt.query([])?;
        while let Some(r) = found.next()? {
            let (seq, t, order, description, message): (
                i64,
                String,
                String,
                String,
                Option<String>,
            ) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            let key = DedupKey::of(
                ActivityType::parse(&t).unwrap_or(ActivityType::Documents),
                &order,
                &description,
                message.as_deref(),
            );
            rows.push((seq, key.short_hash()));
        }
    }
    let mut update = conn.prepare("UPDATE activities SET dedup_hash = ?2 WHERE seq = ?1")?;
    for (seq, hash) in rows {
        update.execute(params![seq, hash])?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, applies migrations and
    /// starts the writer. A corrupt or unwritable file is an error here.
    pub async fn open(path: &Path, quarantine_max: u64) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        type Opened = (Connection, WalFile, Connection);
        let (conn, wal, checkpoints) =
            tokio::task::spawn_blocking(move || -> Result<Opened, StoreError> {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        open_error(&p, format!("cannot create folder {}: {e}", dir.display()))
                    })?;
                }
                let mut conn = open_writer(&p).map_err(|e| open_error(&p, e))?;
                migrate(&mut conn).map_err(|e| open_error(&p, e))?;
                // The migration's write created the WAL; make it durable too.
                let mut wal = WalFile::open(&p).map_err(|e| open_error(&p, e))?;
                wal.sync().map_err(|e| open_error(&p, e))?;
                let checkpoints = open_writer(&p).map_err(|e| open_error(&p, e))?;
                Ok((conn, wal, checkpoints))
            })
            .await
            .map_err(|e| open_error(&path, e))??;

        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let last_failure: FailureLog = Arc::new(Mutex::new(None));
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn({
                let failures = Arc::clone(&last_failure);
                move || run_writer(conn, wal, checkpoints, rx, failures)
            })
            .map_err(|e| open_error(&path, e))?;

        Ok(SqliteStore {
            path,
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Arc::new(Mutex::new(Vec::new())),
            last_failure,
            quarantine_max,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the writer's next transaction; answers after the commit.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let sender = self
            .writes
            .lock()
            .map_err(|_| StoreError::unavailable("store lock poisoned"))?
            .clone()
            .ok_or_else(|| StoreError::unavailable("store is closed"))?;
        let (reply, rx) = oneshot::channel::<Result<R, StoreError>>();
        let op: Box<dyn WriteOp> = Box::new(Op {
            f,
            result: None,
            reply,
        });
        sender
            .send(op)
            .await
            .map_err(|_| StoreError::unavailable("store writer has stopped"))?;
        rx.await
            .map_err(|_| StoreError::unavailable("store writer has stopped"))?
    }

    /// Runs `f` on a pooled read connection, off the async threads.
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().ok().and_then(|mut v| v.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_reader(&path).map_err(unavailable)?,
            };
            let out = f(&conn);
            if let Ok(mut v) = readers.lock()
                && v.len() < READ_POOL
            {
                v.push(conn);
            }
            out
        })
        .await
        .map_err(StoreError::unavailable)?
    }
}

/// The WAL file, held open to flush it. SQLite keeps the same file for as
/// long as a connection is open; should it ever be replaced (only after a
/// complete checkpoint, which syncs the database file), the new one is opened.
struct WalFile {
    path: PathBuf,
    file: std::fs::File,
}

impl WalFile {
    fn open(db: &Path) -> std::io::Result<Self> {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        let path = PathBuf::from(path);
        let file = std::fs::File::open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(WalFile { path, file })
    }

    /// Flushes everything written to the WAL so far to the disk.
    fn sync(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
            if current.is_some() && current != self.file.metadata().map(|m| m.ino()).ok() {
                self.file = std::fs::File::open(&self.path)?;
            }
        }
        self.file.sync_data()
    }
}

/// Set once a flush has failed: every later write is refused with this.
type Broken = Arc<std::sync::OnceLock<String>>;

/// Whether the syncer is flushing; the writer keeps its transaction open
/// (taking in more writes) until it is not, so each flush covers as many
/// writes as arrived during the previous one.
struct SyncerState {
    busy: std::sync::atomic::AtomicBool,
    writer: std::thread::Thread,
}

/// How long the writer sleeps between looks at its queue while the syncer is
/// flushing (the syncer also wakes it when done).
const SYNC_WAIT_POLL: std::time::Duration = std::time::Duration::from_micros(250);

/// WAL size, in pages, past which the checkpointer copies the WAL into the
/// database file (SQLite's own automatic checkpoint does it at 1,000 pages,
/// inside a commit, where it held up every waiting request for 3 to 20 ms).
const CHECKPOINT_PAGES: i32 = if cfg!(test) { 50 } else { 1_000 };
/// WAL size past which the writer finishes a checkpoint itself. Under
/// sustained load the checkpointer never catches up with the last commit, and
/// SQLite starts the WAL over only once everything in it is copied; this
/// bounds the file (at 4 KiB pages, 64 MiB).
const WAL_LIMIT_PAGES: i32 = if cfg!(test) { 400 } else { 16_000 };

/// The checkpointer thread: copies the WAL into the database file when the
/// writer asks, beside the writer instead of inside its commits. Its own
/// connection runs with `synchronous=NORMAL`, so a checkpoint syncs the WAL
/// before copying and the database file after.
struct Checkpointer {
    thread: std::thread::JoinHandle<()>,
    wanted: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointer {
    fn start(conn: Connection) -> std::io::Result<Checkpointer> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let wanted = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn({
                let (wanted, stop) = (Arc::clone(&wanted), Arc::clone(&stop));
                move || {
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park_timeout(std::time::Duration::from_secs(1));
                        if wanted.swap(false, Ordering::AcqRel)
                            && let Err(e) = checkpoint(&conn)
                        {
                            tracing::warn!(error = %e, "WAL checkpoint failed");
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            thread,
            wanted,
            stop,
        })
    }

    fn request(&self) {
        self.wanted
            .store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// Copies what it can of the WAL into the database file without waiting for
/// anyone (a checkpoint already running elsewhere makes it a no-op).
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

type WalHook = fn(&mut rusqlite::hooks::Wal, std::ffi::c_int) -> rusqlite::Result<()>;

/// The writer thread: applies queued writes in a transaction, commits it when
/// the syncer is free, and hands the committed writes to the syncer.
fn run_writer(
    mut conn: Connection,
    wal: WalFile,
    checkpoints: Connection,
    mut rx: mpsc::Receiver<Box<dyn WriteOp>>,
    failures: FailureLog,
) {
    use std::sync::atomic::{AtomicI32, Ordering};

    // The WAL's size after each commit. Registering this hook also turns off
    // SQLite's automatic checkpoint inside commits.
    let wal_pages = Arc::new(AtomicI32::new(0));
    let hooked = conn.wal_hook(Some({
        let wal_pages = Arc::clone(&wal_pages);
        move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            wal_pages.store(pages, Ordering::Relaxed);
            Ok(())
        }
    }));
    let started = hooked
        .map_err(|e| e.to_string())
        .and_then(|()| Checkpointer::start(checkpoints).map_err(|e| e.to_string()));
    let checkpointer = match started {
        Ok(c) => Some(c),
        Err(e) => {
            // SQLite's automatic checkpoint comes back: slower, still correct.
            tracing::warn!(error = %e, "no checkpoint thread; SQLite checkpoints inside commits");
            let _ = conn.wal_hook(None::<WalHook>);
            let _ = conn.pragma_update(None, "wal_autocheckpoint", 1000);
            None
        }
    };
    let mut inline_checkpoint_at = WAL_LIMIT_PAGES;

    let broken: Broken = Arc::default();
    let state = Arc::new(SyncerState {
        busy: false.into(),
        writer: std::thread::current(),
    });
    let (synced_tx, synced_rx) = std::sync::mpsc::channel::<Vec<Box<dyn WriteOp>>>();
    let syncer = std::thread::Builder::new()
        .name("sqlite-syncer".into())
        .spawn({
            let (broken, failures, state) = (
                Arc::clone(&broken),
                Arc::clone(&failures),
                Arc::clone(&state),
            );
            move || run_syncer(wal, synced_rx, broken, failures, state)
        });
    let syncer = match syncer {
        Ok(handle) => handle,
        Err(e) => {
            let msg = format!("cannot start the WAL syncer thread: {e}");
            tracing::error!(error = %msg, "store cannot take writes");
            while let Some(op) = rx.blocking_recv() {
                op.finish(Err(StoreError::unavailable(msg.clone())));
            }
            if let Some(checkpointer) = checkpointer {
                checkpointer.stop();
            }
            return;
        }
    };

    while let Some(first) = rx.blocking_recv() {
        if let Some(msg) = broken.get() {
            first.finish(Err(StoreError::unavailable(msg.clone())));
            continue;
        }
        let mut batch = Batch::begin(&conn, first);
        // Take in every write that arrives until the syncer is free.
        while batch.open() {
            match rx.try_recv() {
                Ok(op) => batch.apply(&conn, op),
                Err(_) if state.busy.load(Ordering::Acquire) => {
                    std::thread::park_timeout(SYNC_WAIT_POLL);
                }
                Err(_) => break,
            }
        }
        state.busy.store(true, Ordering::Release);
        if let Err(msg) = batch.commit(&conn, &synced_tx) {
            state.busy.store(false, Ordering::Release);
            if let Ok(mut f) = failures.lock() {
                *f = Some((std::time::Instant::now(), msg));
            }
        }

        let pages = wal_pages.load(Ordering::Relaxed);
        if let Some(checkpointer) = &checkpointer {
            if pages >= inline_checkpoint_at {
                // Only the pages since the checkpointer's last pass are left
                // to copy; once all are, the next transaction starts the WAL
                // over.
                if let Err(e) = checkpoint(&conn) {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
                inline_checkpoint_at = pages.saturating_add(CHECKPOINT_PAGES);
            } else if pages >= CHECKPOINT_PAGES {
                checkpointer.request();
            }
            if pages < WAL_LIMIT_PAGES {
                inline_checkpoint_at = WAL_LIMIT_PAGES;
            }
        }
    }
    // Queue closed: let the syncer answer the last writes, then fold the WAL
    // back into the file (a checkpoint syncs the database file).
    drop(synced_tx);
    let _ = syncer.join();
    if let Some(checkpointer) = checkpointer {
        checkpointer.stop();
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
        tracing::warn!(error = %e, "WAL checkpoint at close failed");
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the database failed");
    }
}

/// The syncer thread: flushes the WAL once for every committed batch waiting,
/// then answers their callers.
fn run_syncer(
    mut wal: WalFile,
    committed: std::sync::mpsc::Receiver<Vec<Box<dyn WriteOp>>>,
    broken: Broken,
    failures: FailureLog,
    state: Arc<SyncerState>,
) {
    let mut waiting: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = committed.recv() {
        waiting.extend(first);
        while let Ok(more) = committed.try_recv() {
            waiting.extend(more);
        }
        let outcome = match broken.get() {
            Some(msg) => Err(msg.clone()),
            None => wal.sync().map_err(|e| {
                let msg = format!(
                    "flushing the write-ahead log failed ({e}); the store takes no more \
                     writes until qualia-webhook is restarted"
                );
                tracing::error!(error = %msg, writes = waiting.len(), "store cannot make writes durable");
                let _ = broken.set(msg.clone());
                if let Ok(mut f) = failures.lock() {
                    *f = Some((std::time::Instant::now(), msg.clone()));
                }
                msg
            }),
        };
        state
            .busy
            .store(false, std::sync::atomic::Ordering::Release);
        state.writer.unpark();
        for op in waiting.drain(..) {
            op.finish(outcome.clone().map_err(StoreError::unavailable));
        }
    }
}

/// Runs a statement without parameters, prepared once per connection.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// One transaction of the writer.
///
/// Writes are applied one after the other without savepoints: a savepoint
/// makes SQLite copy every page a write touches into a sub-journal, which
/// doubled the bytes written per notification (docs/performance.md). Should
/// a write fail, the transaction is undone and applied again "carefully",
/// each write in its own savepoint, so that only the failing write is lost.
struct Batch {
    applied: Vec<Box<dyn WriteOp>>,
    /// Whether each write is in its own savepoint.
    careful: bool,
    /// The last failure of a single write (undone, answered with its error).
    op_failure: Option<String>,
    /// Why the whole transaction is lost, if it is.
    aborted: Option<String>,
}

impl Batch {
    fn begin(conn: &Connection, first: Box<dyn WriteOp>) -> Batch {
        let mut batch = Batch {
            applied: Vec::with_capacity(64),
            careful: false,
            op_failure: None,
            aborted: None,
        };
        match run_cached(conn, "BEGIN IMMEDIATE") {
            Ok(()) => batch.apply(conn, first),
            Err(e) => {
                batch.aborted = Some(e.to_string());
                batch.applied.push(first);
            }
        }
        batch
    }

    /// Whether more writes can join.
    fn open(&self) -> bool {
        self.aborted.is_none() && self.applied.len() < MAX_BATCH
    }

    fn apply(&mut self, conn: &Connection, mut op: Box<dyn WriteOp>) {
        if self.careful || self.aborted.is_some() {
            self.apply_in_savepoint(conn, op);
            return;
        }
        let result = op.apply(conn);
        self.applied.push(op);
        if result.is_err() || conn.is_autocommit() {
            self.redo_carefully(conn);
        }
    }

    /// Undoes the transaction and applies its writes again, each in its own
    /// savepoint.
    fn redo_carefully(&mut self, conn: &Connection) {
        self.careful = true;
        if !conn.is_autocommit()
            && let Err(e) = conn.execute_batch("ROLLBACK")
        {
            self.aborted = Some(e.to_string());
            return;
        }
        if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
            self.aborted = Some(e.to_string());
            return;
        }
        for op in std::mem::take(&mut self.applied) {
            self.apply_in_savepoint(conn, op);
        }
    }

    fn apply_in_savepoint(&mut self, conn: &Connection, mut op: Box<dyn WriteOp>) {
        if self.aborted.is_some() {
            // Nothing more can join a lost transaction; answered at commit.
            self.applied.push(op);
            return;
        }
        if let Err(e) = run_cached(conn, "SAVEPOINT w") {
            self.aborted = Some(e.to_string());
            self.applied.push(op);
            return;
        }
        let result = op.apply(conn);
        self.applied.push(op);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O error):
            // nothing in this batch is committed.
            self.aborted = Some("the database rolled the transaction back".into());
            return;
        }
        let end = match result {
            Ok(()) => run_cached(conn, "RELEASE w"),
            Err(msg) => {
                self.op_failure = Some(msg);
                conn.execute_batch("ROLLBACK TO w; RELEASE w")
            }
        };
        if let Err(e) = end {
            self.aborted = Some(e.to_string());
        }
    }

    /// Commits and hands the writes to the syncer, or answers every write
    /// with the failure. Returns the last failure, if any.
    fn commit(
        self,
        conn: &Connection,
        syncer: &std::sync::mpsc::Sender<Vec<Box<dyn WriteOp>>>,
    ) -> Result<(), String> {
        let outcome = match self.aborted {
            Some(msg) => Err(msg),
            None => run_cached(conn, "COMMIT").map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(()) => {
                if let Err(std::sync::mpsc::SendError(ops)) = syncer.send(self.applied) {
                    for op in ops {
                        op.finish(Err(StoreError::unavailable("the WAL syncer has stopped")));
                    }
                    return Err("the WAL syncer has stopped".into());
                }
                self.op_failure.map_or(Ok(()), Err)
            }
            Err(msg) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                tracing::error!(error = %msg, writes = self.applied.len(), "store commit failed");
                for op in self.applied {
                    op.finish(Err(StoreError::unavailable(format!(
                        "commit failed: {msg}"
                    ))));
                }
                Err(msg)
            }
        }
    }
}

/// Inside the writer: record one activity (see `Store::record_activity`).
fn record_in_tx(conn: &Connection, new: &NewActivity) -> rusqlite::Result<Recorded> {
    let n = &new.notification;
    let key = n.dedup_key();
    let hash = key.short_hash();
    let window_ms = new.dedup_window.as_millis() as i64;

    if key.forever || window_ms > 0 {
        // A redelivery: the same order with the same key, stored within the
        // window (forever for a message). The writer is the only one, so
        // nothing can come between this look and the insert below.
        let since = if key.forever {
            i64::MIN
        } else {
            new.received_ms - window_ms
        };
        let mut stmt = conn.prepare_cached(
            "SELECT activity_id, activity_type, description, message_id FROM activities
             WHERE order_id = ?1 AND dedup_hash = ?2 AND received_ms > ?3
             ORDER BY seq DESC",
        )?;
        let mut rows = stmt.query(params![n.order_id.as_ref(), hash, since])?;
        let mut original: Option<String> = None;
        while let Some(r) = rows.next()? {
            let (t, description, message): (String, String, Option<String>) =
                (r.get(1)?, r.get(2)?, r.get(3)?);
            let same = ActivityType::parse(&t).is_some_and(|t| {
                DedupKey::of(t, n.order_id.as_ref(), &description, message.as_deref()) == key
            });
            if same {
                original = Some(r.get(0)?);
                break;
            }
        }
        drop(rows);
        if let Some(original) = original {
            let deliveries: i64 = conn
                .prepare_cached(
                    "UPDATE activities SET deliveries = deliveries + 1, last_delivery_ms = ?2
                     WHERE activity_id = ?1 RETURNING deliveries",
                )?
                .query_row(params![original, new.received_ms], |r| r.get(0))?;
            return Ok(Recorded {
                activity_id: original,
                duplicate: true,
                deliveries: deliveries as u64,
            });
        }
    }

    conn.prepare_cached(
        "INSERT INTO activities(activity_id, order_id, activity_type, description, message_id,
                                received_ms, request_id, raw, enrichment, deliveries, last_delivery_ms,
                                dedup_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?6, ?10)",
    )?
    .execute(params![
        new.activity_id,
        n.order_id.as_ref(),
        n.activity_type.as_str(),
        n.description,
        n.message_id.as_ref().map(AsRef::<str>::as_ref),
        new.received_ms,
        new.request_id,
        n.raw,
        Enrichment::initial(n).as_str(),
        hash,
    ])?;

    if n.needs_enrichment() {
        conn.prepare_cached(
            "INSERT INTO jobs(job_id, kind, order_id, message_id, activity_id, state, attempts,
                              next_attempt_ms, created_ms, updated_ms)
             VALUES (?1, 'fetch_message', ?2, ?3, ?4, 'pending', 0, ?5, ?5, ?5)",
        )?
        .execute(params![
            ulid::Ulid::generate().to_string(),
            n.order_id.as_ref(),
            n.message_id.as_ref().map(AsRef::<str>::as_ref),
            new.activity_id,
            new.received_ms,
        ])?;
    }
    Ok(Recorded {
        activity_id: new.activity_id.clone(),
        duplicate: false,
        deliveries: 1,
    })
}

fn set_enrichment(conn: &Connection, activity_id: &str, e: Enrichment) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE activities SET enrichment = ?2 WHERE activity_id = ?1")?
        .execute(params![activity_id, e.as_str()])?;
    Ok(())
}

/// Inside the writer: apply one job outcome (see `Store::finish_jobs`).
fn finish_in_tx(
    conn: &Connection,
    token: &str,
    now_ms: i64,
    outcome: &JobOutcome,
) -> rusqlite::Result<()> {
    match outcome {
        JobOutcome::Done { job, message } => {
            let attachments = serde_json::to_string(&message.attachments)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            conn.prepare_cached(
                "INSERT INTO messages(order_id, message_id, order_number, from_name, text,
                                      created_date, read, attachments, stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(order_id, message_id) DO UPDATE SET
                     order_number = excluded.order_number, from_name = excluded.from_name,
                     text = excluded.text, created_date = excluded.created_date,
                     read = excluded.read, attachments = excluded.attachments",
            )?
            .execute(params![
                message.order_id.as_ref(),
                message.message_id.as_ref(),
                message.order_number,
                message.from_name,
                message.text,
                message.created_date,
                message.read,
                attachments,
                message.stored_ms,
            ])?;
            conn.prepare_cached(
                "UPDATE jobs SET state = 'done', lease_until_ms = NULL, lease_owner = NULL,
                     last_error = NULL, updated_ms = ?2
                 WHERE job_id = ?1 AND state = 'pending'",
            )?
            .execute(params![job.job_id, now_ms])?;
            set_enrichment(conn, &job.activity_id, Enrichment::Enriched)
        }
        JobOutcome::Retry {
            job,
            next_attempt_ms,
            error,
            count_attempt,
        } => {
            conn.prepare_cached(
                "UPDATE jobs SET attempts = attempts + ?3, next_attempt_ms = ?4, last_error = ?5,
                     lease_until_ms = NULL, lease_owner = NULL, updated_ms = ?6
                 WHERE job_id = ?1 AND lease_owner = ?2 AND state = 'pending'",
            )?
            .execute(params![
                job.job_id,
                token,
                i64::from(*count_attempt),
                next_attempt_ms,
                error,
                now_ms
            ])?;
            Ok(())
        }
        JobOutcome::Dead { job, error } => {
            let changed = conn
                .prepare_cached(
                    "UPDATE jobs SET state = 'dead', attempts = attempts + 1, last_error = ?3,
                         lease_until_ms = NULL, lease_owner = NULL, updated_ms = ?4
                     WHERE job_id = ?1 AND lease_owner = ?2 AND state = 'pending'",
                )?
                .execute(params![job.job_id, token, error, now_ms])?;
            if changed > 0 {
                set_enrichment(conn, &job.activity_id, Enrichment::Failed)?;
            }
            Ok(())
        }
    }
}

/// A column held something this program never writes.
fn corrupt(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnName(format!("unexpected {what} {value:?} in the database"))
}

const ACTIVITY_COLUMNS: &str = "seq, activity_id, order_id, activity_type, description, message_id,
    received_ms, request_id, raw, enrichment, deliveries, last_delivery_ms";

fn activity_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, ActivityRecord)> {
    let order_id: String = r.get(2)?;
    let type_s: String = r.get(3)?;
    let message_id: Option<String> = r.get(5)?;
    let enrichment_s: String = r.get(9)?;
    Ok((
        r.get(0)?,
        ActivityRecord {
            activity_id: r.get(1)?,
            order_id: OrderId::parse(order_id.clone())
                .map_err(|_| corrupt("order id", &order_id))?,
            activity_type: ActivityType::parse(&type_s).ok_or_else(|| corrupt("type", &type_s))?,
            description: r.get(4)?,
            message_id: message_id
                .map(|m| MessageId::parse(m.clone()).map_err(|_| corrupt("message id", &m)))
                .transpose()?,
            received_ms: r.get(6)?,
            request_id: r.get(7)?,
            raw: r.get(8)?,
            enrichment: Enrichment::parse(&enrichment_s)
                .ok_or_else(|| corrupt("enrichment", &enrichment_s))?,
            deliveries: r.get::<_, i64>(10)? as u64,
            last_delivery_ms: r.get(11)?,
        },
    ))
}

const JOB_COLUMNS: &str = "job_id, kind, order_id, message_id, activity_id, state, attempts,
    next_attempt_ms, lease_until_ms, last_error, created_ms, updated_ms";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let order_id: String = r.get(2)?;
    let message_id: Option<String> = r.get(3)?;
    let state_s: String = r.get(5)?;
    Ok(JobRecord {
        job_id: r.get(0)?,
        kind: r.get(1)?,
        order_id: OrderId::parse(order_id.clone()).map_err(|_| corrupt("order id", &order_id))?,
        message_id: message_id
            .map(|m| MessageId::parse(m.clone()).map_err(|_| corrupt("message id", &m)))
            .transpose()?,
        activity_id: r.get(4)?,
        state: JobState::parse(&state_s).ok_or_else(|| corrupt("job state", &state_s))?,
        attempts: r.get::<_, i64>(6)? as u32,
        next_attempt_ms: r.get(7)?,
        lease_until_ms: r.get(8)?,
        last_error: r.get(9)?,
        created_ms: r.get(10)?,
        updated_ms: r.get(11)?,
    })
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRecord> {
    let order_id: String = r.get(0)?;
    let message_id: String = r.get(1)?;
    let attachments: String = r.get(7)?;
    Ok(MessageRecord {
        order_id: OrderId::parse(order_id.clone()).map_err(|_| corrupt("order id", &order_id))?,
        message_id: MessageId::parse(message_id.clone())
            .map_err(|_| corrupt("message id", &message_id))?,
        order_number: r.get(2)?,
        from_name: r.get(3)?,
        text: r.get(4)?,
        created_date: r.get(5)?,
        read: r.get(6)?,
        attachments: serde_json::from_str(&attachments)
            .map_err(|_| corrupt("attachments", &attachments))?,
        stored_ms: r.get(8)?,
    })
}

fn parse_seq_cursor(cursor: Option<&str>) -> Result<i64, StoreError> {
    match cursor {
        None => Ok(i64::MAX),
        Some(c) => c
            .strip_prefix("s")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .ok_or(StoreError::InvalidCursor),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn record_activity(&self, new: NewActivity) -> Result<Recorded, StoreError> {
        self.write(move |conn| record_in_tx(conn, &new)).await
    }

    async fn quarantine(&self, entry: QuarantineEntry) -> Result<(), StoreError> {
        let max = self.quarantine_max as i64;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO quarantine(received_ms, request_id, reason, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![entry.received_ms, entry.request_id, entry.reason, entry.body])?;
            conn.prepare_cached(
                "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?1",
            )?
            .execute([max])?;
            Ok(())
        })
        .await
    }

    async fn order_activities(
        &self,
        order_id: &OrderId,
    ) -> Result<Vec<ActivityRecord>, StoreError> {
        let order_id = order_id.clone();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {ACTIVITY_COLUMNS} FROM activities WHERE order_id = ?1 ORDER BY seq"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let rows = stmt
                .query_map([order_id.as_ref()], activity_from_row)
                .map_err(unavailable)?;
            rows.map(|r| r.map(|(_, a)| a).map_err(unavailable))
                .collect()
        })
        .await
    }

    async fn recent_activities(
        &self,
        query: ActivityQuery,
    ) -> Result<Page<ActivityRecord>, StoreError> {
        let before = parse_seq_cursor(query.cursor.as_deref())?;
        self.read(move |conn| {
            let sql = format!(
                "SELECT {ACTIVITY_COLUMNS} FROM activities
                 WHERE seq < ?1 AND (?2 IS NULL OR activity_type = ?2) AND received_ms >= ?3
                 ORDER BY seq DESC LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let limit = query.limit.max(1) as i64;
            let rows = stmt
                .query_map(
                    params![
                        before,
                        query.activity_type.map(ActivityType::as_str),
                        query.since_ms.unwrap_or(i64::MIN),
                        limit + 1
                    ],
                    activity_from_row,
                )
                .map_err(unavailable)?;
            let mut items = rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)?;
            let next_cursor = if items.len() as i64 > limit {
                items.truncate(limit as usize);
                items.last().map(|(seq, _)| format!("s{seq}"))
            } else {
                None
            };
            Ok(Page {
                items: items.into_iter().map(|(_, a)| a).collect(),
                next_cursor,
            })
        })
        .await
    }

    async fn order_messages(&self, order_id: &OrderId) -> Result<Vec<MessageRecord>, StoreError> {
        let order_id = order_id.clone();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT order_id, message_id, order_number, from_name, text, created_date,
                            read, attachments, stored_ms
                     FROM messages WHERE order_id = ?1 ORDER BY message_id",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([order_id.as_ref()], message_from_row)
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn list_jobs(
        &self,
        state: JobState,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<Page<JobRecord>, StoreError> {
        let after = match cursor {
            None => String::new(),
            Some(c) => c
                .strip_prefix("j")
                .filter(|id| ulid::Ulid::from_string(id).is_ok())
                .map(str::to_owned)
                .ok_or(StoreError::InvalidCursor)?,
        };
        self.read(move |conn| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE state = ?1 AND job_id > ?2
                 ORDER BY job_id LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
            let limit = limit.max(1) as i64;
            let rows = stmt
                .query_map(params![state.as_str(), after, limit + 1], job_from_row)
                .map_err(unavailable)?;
            let mut items = rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)?;
            let next_cursor = if items.len() as i64 > limit {
                items.truncate(limit as usize);
                items.last().map(|j| format!("j{}", j.job_id))
            } else {
                None
            };
            Ok(Page { items, next_cursor })
        })
        .await
    }

    async fn quarantined(&self, limit: u32) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT received_ms, request_id, reason, body FROM quarantine
                     ORDER BY id DESC LIMIT ?1",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    Ok(QuarantineEntry {
                        received_ms: r.get(0)?,
                        request_id: r.get(1)?,
                        reason: r.get(2)?,
                        body: r.get(3)?,
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }

    async fn claim_jobs(
        &self,
        now_ms: i64,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Claim, StoreError> {
        let token = ulid::Ulid::generate().to_string();
        let until = now_ms + lease.as_millis() as i64;
        let t = token.clone();
        let jobs = self
            .write(move |conn| {
                let sql = format!(
                    "UPDATE jobs SET lease_until_ms = ?1, lease_owner = ?2, updated_ms = ?3
                     WHERE job_id IN (
                         SELECT job_id FROM jobs
                         WHERE state = 'pending' AND next_attempt_ms <= ?3
                           AND (lease_until_ms IS NULL OR lease_until_ms <= ?3)
                         ORDER BY next_attempt_ms LIMIT ?4)
                     RETURNING {JOB_COLUMNS}"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt.query_map(params![until, t, now_ms, limit as i64], job_from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(Claim { token, jobs })
    }

    async fn finish_jobs(
        &self,
        token: &str,
        now_ms: i64,
        outcomes: Vec<JobOutcome>,
    ) -> Result<(), StoreError> {
        let token = token.to_owned();
        self.write(move |conn| {
            for outcome in &outcomes {
                finish_in_tx(conn, &token, now_ms, outcome)?;
            }
            Ok(())
        })
        .await
    }

    async fn retry_job(&self, job_id: &str, now_ms: i64) -> Result<JobRecord, StoreError> {
        let job_id = job_id.to_owned();
        let outcome = self
            .write(move |conn| {
                let sql = format!(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_ms = ?2,
                         lease_until_ms = NULL, lease_owner = NULL, updated_ms = ?2
                     WHERE job_id = ?1 AND state = 'dead' RETURNING {JOB_COLUMNS}"
                );
                let job = conn
                    .prepare_cached(&sql)?
                    .query_row(params![job_id, now_ms], job_from_row)
                    .optional()?;
                match job {
                    Some(job) => {
                        set_enrichment(conn, &job.activity_id, Enrichment::Pending)?;
                        Ok(Ok(job))
                    }
                    None => {
                        let state: Option<String> = conn
                            .prepare_cached("SELECT state FROM jobs WHERE job_id = ?1")?
                            .query_row([&job_id], |r| r.get(0))
                            .optional()?;
                        Ok(Err(state))
                    }
                }
            })
            .await?;
        outcome.map_err(|state| match state {
            None => StoreError::NotFound,
            Some(state) => StoreError::Conflict(format!("the job is {state}, not dead")),
        })
    }

    async fn retry_dead_jobs(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE activities SET enrichment = 'pending'
                 WHERE activity_id IN (SELECT activity_id FROM jobs WHERE state = 'dead')",
            )?
            .execute([])?;
            let n = conn
                .prepare_cached(
                    "UPDATE jobs SET state = 'pending', attempts = 0, next_attempt_ms = ?1,
                         lease_until_ms = NULL, lease_owner = NULL, updated_ms = ?1
                     WHERE state = 'dead'",
                )?
                .execute([now_ms])?;
            Ok(n as u64)
        })
        .await
    }

    async fn job_counts(&self) -> Result<JobCounts, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT state, COUNT(*) FROM jobs WHERE state IN ('pending', 'dead') GROUP BY state",
                )
                .map_err(unavailable)?;
            let mut counts = JobCounts::default();
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(unavailable)?;
            for row in rows {
                let (state, n) = row.map_err(unavailable)?;
                match state.as_str() {
                    "pending" => counts.pending = n as u64,
                    _ => counts.dead = n as u64,
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let recent = self
            .last_failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .filter(|(at, _)| at.elapsed() < FAILURE_MEMORY);
        if let Some((at, msg)) = recent {
            return Err(StoreError::unavailable(format!(
                "a write failed {:.1} s ago: {msg}",
                at.elapsed().as_secs_f64()
            )));
        }
        // A real, committed write: the writer is alive and the disk takes
        // writes (a full disk or a read-only file fails here, as ingest
        // would); a read checks the file.
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO meta(key, value) VALUES ('ping_ms', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute([super::now_ms().to_string()])?;
            Ok(())
        })
        .await?;
        self.read(|conn| {
            conn.query_row("SELECT COUNT(*) FROM meta", [], |_| Ok(()))
                .optional()
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn close(&self) {
        let sender = self.writes.lock().ok().and_then(|mut s| s.take());
        drop(sender);
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        if let Ok(mut readers) = self.readers.lock() {
            readers.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes that share a transaction with a failing write are committed;
    /// only the failing one is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_does_not_take_its_batch_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("t.db"), 10)
                .await
                .unwrap(),
        );
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..200i64 {
            let store = Arc::clone(&store);
            writes.spawn(async move {
                let result = store
                    .write(move |conn| {
                        conn.execute(
                            "INSERT INTO meta(key, value) VALUES (?1, 'x')",
                            [format!("k{i}")],
                        )?;
                        if i % 50 == 7 {
                            // Fails after a first statement took effect.
                            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                        }
                        Ok(())
                    })
                    .await;
                (i, result.is_ok())
            });
        }
        let mut refused = Vec::new();
        while let Some(done) = writes.join_next().await {
            let (i, ok) = done.unwrap();
            if !ok {
                refused.push(i);
            }
        }
        refused.sort();
        assert_eq!(refused, vec![7, 57, 107, 157]);
        let stored: i64 = store
            .read(|conn| {
                conn.query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                    r.get(0)
                })
                .map_err(unavailable)
            })
            .await
            .unwrap();
        assert_eq!(
            stored, 196,
            "every other write is committed, no part of a failed one"
        );
        store.close().await;
    }

    /// A database written before migration 2 (dedup markers in their own
    /// table) still recognises its notifications' redeliveries afterwards.
    #[tokio::test]
    async fn redeliveries_of_activities_stored_before_migration_2_are_recognised() {
        use crate::activity::Notification;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO activities(activity_id, order_id, activity_type, description,
                     message_id, received_ms, request_id, raw, enrichment, last_delivery_ms)
                 VALUES ('A1', 'order1', 'message', 'hi', 'msg1', 1, 'r', '{}', 'pending', 1)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path, 10).await.unwrap();
        let again = |body: &str| NewActivity {
            activity_id: "A2".into(),
            notification: Notification::parse(body.as_bytes()).unwrap(),
            received_ms: super::super::now_ms(),
            request_id: "r2".into(),
            dedup_window: std::time::Duration::from_secs(600),
        };
        let recorded = store
            .record_activity(again(
                r#"{"type":"message","order_id":"order1","message_id":"msg1","description":"hi"}"#,
            ))
            .await
            .unwrap();
        assert!(recorded.duplicate);
        assert_eq!(
            (recorded.activity_id.as_str(), recorded.deliveries),
            ("A1", 2)
        );
        let other = store
            .record_activity(again(
                r#"{"type":"message","order_id":"order1","message_id":"msg2","description":"hi"}"#,
            ))
            .await
            .unwrap();
        assert!(!other.duplicate, "another message of the same order is new");
        store.close().await;
    }

    /// Under a steady stream of writes the WAL stays bounded: the checkpoint
    /// thread copies it into the database file, and the writer finishes the
    /// copy when the WAL reaches its limit, so SQLite can start it over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_steady_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(SqliteStore::open(&path, 10).await.unwrap());
        let filler = "x".repeat(3000);
        for round in 0..60 {
            let mut writes = tokio::task::JoinSet::new();
            for i in 0..50 {
                let (store, filler) = (Arc::clone(&store), filler.clone());
                writes.spawn(async move {
                    store
                        .write(move |conn| {
                            conn.execute(
                                "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                                params![format!("k{round}-{i}"), filler],
                            )
                        })
                        .await
                });
            }
            while let Some(done) = writes.join_next().await {
                done.unwrap().unwrap();
            }
        }
        // 3,000 rows of 3 KB: about 2,250 pages written, more than five
        // times the limit.
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        let limit = (WAL_LIMIT_PAGES as u64 + 200) * 4096;
        assert!(wal < limit, "WAL of {wal} bytes, limit {limit}");
        let rows: i64 = store
            .read(|conn| {
                conn.query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                    r.get(0)
                })
                .map_err(unavailable)
            })
            .await
            .unwrap();
        assert_eq!(rows, 3000);
        store.close().await;
    }
}
