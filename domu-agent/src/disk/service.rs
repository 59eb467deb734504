//! The dictionary's commands, served by the agent: the disk commands (with `--disks`), component
//! discovery and benchmarks (every agent). Every request is answered on
//! `<root>/response/<sender>` with its `request_id`; the agent never dies on a request.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use topics::payload::{
    self, AnnounceEvent, BenchmarkArgs, BenchmarkReply, Component, CopyFileArgs, CreateFileArgs,
    CreateFileReply, DiscoverReply, ErrorEvent, FootprintArgs, FootprintReply, ListDisksReply,
    ListFilesArgs, ListFilesReply, NoArgs, ReadFileArgs, ReadFileReply, RemoveFileArgs, StatusOnly,
    level,
};
use topics::topic::{Command, Notification, Topic};
use topics::vm::VmId;
use topics::{ErrorBody, ErrorCode, RequestId, Response, Status};
use topics::{filter, legacy_line};

use crate::config::Limits;
use crate::disk::announce::Announcer;
use crate::disk::disks::Disks;
use crate::disk::fsops::{self, FsError};
use crate::disk::once::{Key, Once, Seen};
use crate::disk::paths;
use crate::disk::upload::{self, Chunk, Uploads};
use crate::hub::{Client, Hub, Publication};

/// The local repository's disk id (in `list_disks`, commands and `new_file` notifications).
pub use crate::disk::disks::REPOSITORY;

/// The service's way to Dom0: its client of the hub, and the hub (benchmark round trips).
#[derive(Debug)]
pub struct Uplink {
    pub client: Arc<Client>,
    pub hub: Hub,
}

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Service {
    pub vm: VmId,
    pub disks: Option<Disks>,
    pub repository: Option<PathBuf>,
    pub limits: Limits,
    pub uplink: Uplink,
    pub announcer: Announcer,
    /// Disk operations running at once.
    permits: Semaphore,
    benchmark_running: AtomicBool,
    /// Requests seen and answered: a redelivery is answered alike, not run again.
    once: std::sync::Mutex<Once>,
    /// The uploads going (`create_file` in chunks), each with its unnamed file.
    uploads: std::sync::Mutex<Uploads<fsops::Pending>>,
    /// Chunks are served one at a time in the order they came (each request has its own task).
    turns: Turns,
}

/// Serves tasks one at a time in the order they took their ticket: the chunks of an upload come
/// in order on the channel and must be written in that order.
#[derive(Debug)]
struct Turns {
    next: std::sync::atomic::AtomicU64,
    serving: tokio::sync::watch::Sender<u64>,
}

/// A place in the [`Turns`]: the next ticket is served once this one is dropped.
#[derive(Debug)]
pub struct Turn<'a> {
    turns: &'a Turns,
    ticket: u64,
}

impl Turns {
    fn new() -> Turns {
        Turns {
            next: std::sync::atomic::AtomicU64::new(0),
            serving: tokio::sync::watch::Sender::new(0),
        }
    }

    fn ticket(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    async fn wait(&self, ticket: u64) -> Turn<'_> {
        let mut rx = self.serving.subscribe();
        let _ = rx.wait_for(|s| *s >= ticket).await;
        Turn {
            turns: self,
            ticket,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let next = self.ticket + 1;
        self.turns.serving.send_modify(|s| *s = (*s).max(next));
    }
}

/// True when a `create_file` payload is a chunk of an upload (a cheap look: one that only seems
/// so is served in turn too, which costs nothing but order).
fn is_chunk(payload: &[u8]) -> bool {
    payload.windows(11).any(|w| w == b"\"upload_id\"")
}

fn fs_error(e: FsError) -> ErrorBody {
    ErrorBody::new(e.code(), e.to_string())
}

impl Service {
    pub fn new(
        vm: VmId,
        disks: Option<Disks>,
        repository: Option<PathBuf>,
        limits: Limits,
        uplink: Uplink,
        announcer: Announcer,
    ) -> Service {
        let permits = Semaphore::new(limits.max_concurrent);
        let uploads = Uploads::new(upload::Bounds {
            max_bytes: limits.max_upload_bytes,
            max_total: limits.max_upload_total,
            idle: topics::upload::IDLE,
        });
        Service {
            vm,
            disks,
            repository,
            limits,
            uplink,
            announcer,
            permits,
            benchmark_running: AtomicBool::new(false),
            once: std::sync::Mutex::new(Once::default()),
            uploads: std::sync::Mutex::new(uploads),
            turns: Turns::new(),
        }
    }

    /// The filters the service subscribes to (the hub renews them on every CONNACK).
    pub fn subscriptions(&self) -> Vec<String> {
        let mut subs = vec![
            Command::Discover.request_topic(),
            Command::Benchmark.request_topic(),
        ];
        // The disk provider (`--disks`) serves the disk commands; the repository is one of its
        // disks.
        if self.disks.as_ref().is_some_and(|d| d.root.is_some()) {
            subs.push(filter::disk_requests());
        }
        subs
    }

    /// Dispatches one message from the session: each request is served in its own task of
    /// `tasks` so a long copy never delays a `list_disks`.
    pub fn on_message(self: &Arc<Self>, topic: String, payload: Bytes, tasks: &TaskTracker) {
        match Topic::parse(&topic) {
            Ok(Topic::Request(c)) => {
                let me = self.clone();
                // An upload's chunks are served in the order they came.
                let ticket =
                    (c == Command::CreateFile && is_chunk(&payload)).then(|| self.turns.ticket());
                let turns = self.clone();
                tasks.spawn(async move {
                    let _turn = match ticket {
                        Some(t) => Some(turns.turns.wait(t).await),
                        None => None,
                    };
                    me.request(c, &topic, payload).await
                });
            }
            _ => tracing::debug!(topic, "message not for this agent"),
        }
    }

    /// The agent's components: itself and its disks (the repository among them), as `discover`
    /// answers and the announcements say.
    fn components(&self) -> Vec<Component> {
        let mut components = vec![Component {
            id: self.vm.to_string(),
            label: self.vm.to_string(),
            kind: "domu".into(),
        }];
        if let Some(d) = &self.disks {
            if let Ok(disks) = d.list() {
                components.extend(disks.into_iter().map(|d| Component {
                    id: d.id,
                    label: d.label,
                    kind: "disk".into(),
                }));
            }
        }
        components
    }

    /// Announces its components (`system/components/announce/notification`): when the session
    /// comes up, and whenever they change (a disk appears or goes).
    pub async fn announce(&self) {
        let event = AnnounceEvent {
            vm: self.vm.to_string(),
            components: self.components(),
        };
        tracing::debug!(components = event.components.len(), "announcing components");
        self.publish(
            Notification::Announce.topic(),
            serde_json::to_vec(&event).unwrap_or_default(),
        )
        .await;
    }

    /// Publishes at QoS 1; a response says who answered (`responder`), a notification who
    /// it comes from (`origin`): what Dom0 would otherwise fill in on the way.
    async fn publish(&self, topic: String, body: Vec<u8>) {
        let body = match Topic::parse(&topic) {
            Ok(Topic::Response { .. }) => payload::with_responder(&body, self.vm.as_str()),
            Ok(Topic::Notification(_)) => payload::with_origin(&body, self.vm.as_str()),
            _ => body,
        };
        let sent = self
            .uplink
            .client
            .publish(Publication::at_least_once(topic, Bytes::from(body)), None)
            .await;
        if !sent {
            tracing::debug!("session gone; message dropped");
        }
    }

    /// Reports an error the operator must see on `system/events/error/notification`.
    pub async fn report(&self, module: &str, description: String) {
        let ev = ErrorEvent {
            module: format!("{}/{module}", self.vm),
            datetime: topics::rfc3339_now(),
            level: level::ERROR,
            description,
        };
        self.publish(
            Notification::Error.topic(),
            serde_json::to_vec(&ev).unwrap_or_default(),
        )
        .await;
    }

    async fn request(self: Arc<Self>, command: Command, topic: &str, payload: Bytes) {
        if !legacy_line::addressed_to(&payload, self.vm.as_str()) {
            tracing::debug!(topic, "request addressed to another VM");
            return;
        }
        let env = match payload::decode_envelope(&payload) {
            Ok(e) => e,
            Err(e) => {
                // Every VM's request carries the `sender` its link checked or filled in: this one
                // comes from a Dom0 client, which hears why on Dom0's response topic.
                tracing::debug!(topic, error = %e, "request without a valid envelope");
                let rid = serde_json::from_slice::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned))
                    .and_then(|id| RequestId::parse(&id).ok());
                let body = Response::<NoArgs>::error(rid, ErrorBody::from(e)).to_json();
                self.publish(command.response_topic(&VmId::dom0()), body)
                    .await;
                return;
            }
        };
        let reply_topic = command.response_topic(&env.sender);
        let rid = env.request_id.clone();
        tracing::debug!(topic, sender = %env.sender, request_id = ?rid.as_ref().map(RequestId::as_str), "request");
        // At most once: a request with an id seen before is not run again (a benchmark answers
        // twice and a discover costs nothing: both always run).
        let key = rid
            .clone()
            .filter(|_| !matches!(command, Command::Benchmark | Command::Discover))
            .map(|request_id| Key {
                sender: env.sender.clone(),
                command,
                request_id,
            });
        if let Some(k) = &key {
            let seen = self.once().seen(k.clone());
            match seen {
                Seen::First => {}
                Seen::Running => {
                    tracing::debug!(topic, "request delivered again while it runs");
                    return;
                }
                Seen::Answered(body) => {
                    tracing::debug!(topic, "request delivered again: answered as before");
                    self.publish(reply_topic, body).await;
                    return;
                }
            }
        }
        let body = match command {
            Command::ListDisks => self.list_disks(rid).await,
            Command::ListFiles => self.list_files(&payload, rid).await,
            Command::ReadFile => self.read_file(&payload, rid).await,
            Command::CopyFile => self.copy_file(&payload, rid).await,
            Command::RemoveFile => self.remove_file(&payload, rid).await,
            Command::GetFileFootprint => self.footprint(&payload, rid).await,
            Command::CreateFile if is_chunk(&payload) => {
                self.upload_chunk(&env.sender, &payload, rid).await
            }
            Command::CreateFile => self.create_file(&payload, rid).await,
            Command::Discover => self.discover(rid).await,
            Command::Benchmark => {
                self.clone().benchmark(&payload, rid, reply_topic).await;
                return;
            }
            Command::SupervisionCounters => return,
        };
        let again = key.map_or(0, |k| self.once().answered(&k, &body));
        for _ in 0..again {
            self.publish(reply_topic.clone(), body.clone()).await;
        }
        self.publish(reply_topic, body).await;
    }

    fn once(&self) -> std::sync::MutexGuard<'_, Once> {
        self.once.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decodes a request's arguments; a bad field is `invalid_argument` naming it.
    fn args<A: DeserializeOwned>(payload: &[u8]) -> Result<A, ErrorBody> {
        payload::decode_request::<A>(payload)
            .map(|r| r.args)
            .map_err(ErrorBody::from)
    }

    fn disks(&self) -> Result<Disks, ErrorBody> {
        self.disks
            .clone()
            .ok_or_else(|| ErrorBody::new(ErrorCode::Unsupported, "this agent serves no disks"))
    }

    /// Runs blocking file work on the blocking pool, at most `max_concurrent` at once.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, ErrorBody> + Send + 'static,
    ) -> Result<T, ErrorBody> {
        let _permit = self.permits.acquire().await;
        tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
            Err(ErrorBody::new(
                ErrorCode::Internal,
                format!("disk task failed: {e}"),
            ))
        })
    }

    /// A disk command: decodes its arguments, needs disks, does the file work on the blocking pool,
    /// and encodes the answer.
    async fn disk_command<A, D>(
        &self,
        payload: &[u8],
        rid: Option<RequestId>,
        work: impl FnOnce(A, Disks) -> Result<D, ErrorBody> + Send + 'static,
    ) -> Vec<u8>
    where
        A: DeserializeOwned + Send + 'static,
        D: Serialize + Send + 'static,
    {
        let r = match (Self::args::<A>(payload), self.disks()) {
            (Ok(a), Ok(d)) => self.blocking(move || work(a, d)).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self.answer(rid, r).await
    }

    async fn answer<D: Serialize>(
        &self,
        rid: Option<RequestId>,
        r: Result<D, ErrorBody>,
    ) -> Vec<u8> {
        match r {
            Ok(d) => Response::ok(rid, d).to_json(),
            Err(e) => {
                if e.code == ErrorCode::Io || e.code == ErrorCode::Internal {
                    self.report("disks", e.message.clone()).await;
                }
                Response::<D>::error(rid, e).to_json()
            }
        }
    }

    async fn list_disks(&self, rid: Option<RequestId>) -> Vec<u8> {
        // A readdir of the disks directory: microseconds, done in place (no thread hand-off).
        let r = self.disks().and_then(|d| {
            d.list()
                .map(|disks| ListDisksReply { disks })
                .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("cannot list the disks: {e}")))
        });
        self.answer(rid, r).await
    }

    async fn list_files(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let max = self.limits.max_list_entries;
        self.disk_command(payload, rid, move |a: ListFilesArgs, d| {
            let dir = d.open(&a.disk).map_err(fs_error)?;
            let (files, truncated) = fsops::list(&dir, max)
                .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("disk `{}`: {e}", a.disk)))?;
            Ok(ListFilesReply {
                disk: a.disk,
                files,
                truncated,
            })
        })
        .await
    }

    async fn footprint(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        self.disk_command(payload, rid, move |a: FootprintArgs, d| {
            let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
            let dir = d.open(&a.disk).map_err(fs_error)?;
            let footprint = fsops::footprint(&dir, &rel).map_err(fs_error)?;
            Ok(FootprintReply {
                disk: Some(a.disk),
                filepath: Some(a.filepath),
                footprint,
            })
        })
        .await
    }

    async fn remove_file(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let announcer = self.announcer.clone();
        self.disk_command(payload, rid, move |a: RemoveFileArgs, d| {
            let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
            let dir = d.open(&a.disk).map_err(fs_error)?;
            fsops::remove(&dir, &rel).map_err(fs_error)?;
            announcer.forget(&a.disk, &rel);
            Ok(StatusOnly {})
        })
        .await
    }

    async fn create_file(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let max = self.limits.max_create_bytes;
        let announcer = self.announcer.clone();
        self.disk_command(payload, rid, move |a: CreateFileArgs, d| {
            let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
            let data = Self::data(&a.data, max)?;
            let dir = d.open(&a.disk).map_err(fs_error)?;
            fsops::write_atomic(&dir, &rel, a.overwrite, |f| f.write_all(&data))
                .map_err(fs_error)?;
            announcer.announce(&a.disk, &rel, data.len() as u64);
            Ok(StatusOnly {})
        })
        .await
    }

    /// One chunk of an upload (`topics::upload`): taken in order into the upload's unnamed file;
    /// the last one names the file if its size and footprint match.
    async fn upload_chunk(&self, sender: &VmId, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let r = match (Self::args::<CreateFileArgs>(payload), self.disks()) {
            (Ok(a), Ok(d)) => self.take_chunk(sender, a, d).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        self.answer(rid, r).await
    }

    async fn take_chunk(
        &self,
        sender: &VmId,
        a: CreateFileArgs,
        d: Disks,
    ) -> Result<CreateFileReply, ErrorBody> {
        let data = Self::data(&a.data, self.limits.max_create_bytes)?;
        self.drop_idle_uploads();
        let id = a.upload_id.clone().unwrap_or_default();
        let step = self.uploads().chunk(sender, &a, data.len() as u64)?;
        let announcer = self.announcer.clone();
        let now = Instant::now;
        match step {
            Chunk::First => {
                let (a2, data2) = (a.clone(), data.clone());
                let file = self
                    .blocking(move || {
                        let rel = paths::check(&a2.filepath).map_err(|e| fs_error(e.into()))?;
                        let dir = d.open(&a2.disk).map_err(fs_error)?;
                        let mut file =
                            fsops::Pending::open(&dir, &rel, a2.overwrite).map_err(fs_error)?;
                        file.file()
                            .write_all(&data2)
                            .map_err(|e| fs_error(FsError::from_io(&rel, e)))?;
                        Ok(file)
                    })
                    .await?;
                let received = self.uploads().start(sender.clone(), &a, &data, file, now());
                tracing::debug!(upload = %id, disk = %a.disk, "upload started");
                Ok(CreateFileReply {
                    received: Some(received),
                })
            }
            Chunk::Next(entry) => {
                let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
                let rel2 = rel.clone();
                // A chunk that cannot be written ends its upload: the entry and its unnamed file
                // are dropped with the error.
                let entry = self
                    .blocking(move || {
                        let mut entry = entry;
                        entry
                            .file
                            .file()
                            .write_all(&data)
                            .map_err(|e| fs_error(FsError::from_io(&rel2, e)))?;
                        entry.took(&data, now());
                        Ok(entry)
                    })
                    .await?;
                let received = entry.received;
                if !a.last {
                    self.uploads().put_back(&id, *entry);
                    return Ok(CreateFileReply {
                        received: Some(received),
                    });
                }
                let disk = a.disk.clone();
                let file = (*entry).check_final(&a).map_err(|(_, why)| why)?;
                self.blocking(move || file.commit().map_err(fs_error))
                    .await?;
                announcer.announce(&disk, &rel, received);
                tracing::debug!(upload = %id, %disk, size = received, "upload done");
                Ok(CreateFileReply {
                    received: Some(received),
                })
            }
        }
    }

    /// A request's Base64 `data`, decoded if at most `max` bytes.
    fn data(encoded: &str, max: usize) -> Result<Vec<u8>, ErrorBody> {
        topics::binary::decode_limited(encoded, max).map_err(|e| match e {
            topics::binary::Base64Error::TooLarge { .. } => {
                ErrorBody::new(ErrorCode::TooLarge, format!("field `data`: {e}"))
            }
            _ => ErrorBody::new(ErrorCode::InvalidArgument, format!("field `data`: {e}")),
        })
    }

    fn uploads(&self) -> std::sync::MutexGuard<'_, Uploads<fsops::Pending>> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the uploads idle for too long (their unnamed files go with them).
    pub fn drop_idle_uploads(&self) {
        let mut u = self.uploads();
        let gone = u.drop_idle(Instant::now());
        if !gone.is_empty() {
            tracing::info!(
                dropped = gone.len(),
                total = u.dropped_idle,
                "idle uploads dropped"
            );
        }
    }

    /// When the next upload becomes idle, if any is going.
    pub fn next_idle_upload(&self) -> Option<Instant> {
        self.uploads().next_idle()
    }

    async fn copy_file(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let announcer = self.announcer.clone();
        self.disk_command(payload, rid, move |a: CopyFileArgs, d| {
            let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
            let src = d.open(&a.source_disk).map_err(fs_error)?;
            let dst = d.open(&a.target_disk).map_err(fs_error)?;
            let (_, size) =
                fsops::copy_verified(&src, &rel, &dst, &rel, a.overwrite).map_err(fs_error)?;
            announcer.announce(&a.target_disk, &rel, size);
            Ok(StatusOnly {})
        })
        .await
    }

    async fn read_file(&self, payload: &[u8], rid: Option<RequestId>) -> Vec<u8> {
        let repo = self.repository.clone();
        let announcer = self.announcer.clone();
        self.disk_command(payload, rid, move |a: ReadFileArgs, d| {
            let repo = repo.ok_or_else(|| {
                ErrorBody::new(ErrorCode::Unsupported, "no local repository configured")
            })?;
            if a.source_disk == REPOSITORY {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidArgument,
                    "the file is in the repository already (copy_file copies within disks)",
                ));
            }
            let rel = paths::check(&a.filepath).map_err(|e| fs_error(e.into()))?;
            let src = d.open(&a.source_disk).map_err(fs_error)?;
            let dst = fsops::open_root(&repo)
                .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("local repository: {e}")))?;
            let target = Path::new(&a.source_disk).join(&rel);
            let (footprint, size) = match fsops::copy_verified(&src, &rel, &dst, &target, false) {
                Ok(done) => done,
                // Already in the repository: fine if it is the same file, refused otherwise.
                Err(FsError::AlreadyExists(what)) => {
                    let theirs = fsops::footprint(&src, &rel).map_err(fs_error)?;
                    let ours = fsops::footprint(&dst, &target).map_err(fs_error)?;
                    if theirs != ours {
                        return Err(fs_error(FsError::AlreadyExists(what)));
                    }
                    let (_, size) = fsops::open_regular(&dst, &target).map_err(fs_error)?;
                    (ours, size)
                }
                Err(e) => return Err(fs_error(e)),
            };
            announcer.announce(REPOSITORY, &target, size);
            Ok(ReadFileReply {
                disk: Some(REPOSITORY.to_owned()),
                filepath: Some(target.display().to_string()),
                size_in_bytes: Some(size),
                footprint: Some(footprint),
            })
        })
        .await
    }

    async fn discover(&self, rid: Option<RequestId>) -> Vec<u8> {
        let components = self.components();
        Response::ok(rid, DiscoverReply { components }).to_json()
    }

    /// `started` at once, then `finished` with the figures (or `error`), on the same topic.
    async fn benchmark(self: Arc<Self>, payload: &[u8], rid: Option<RequestId>, topic: String) {
        let args = match Self::args::<BenchmarkArgs>(payload) {
            Ok(a) => a,
            Err(e) => {
                return self
                    .publish(topic, Response::<NoArgs>::error(rid, e).to_json())
                    .await;
            }
        };
        if !matches!(args.module.as_str(), "messaging" | "disks") {
            let e = ErrorBody::new(
                ErrorCode::Unsupported,
                format!("unknown module {:?} (messaging, disks)", args.module),
            );
            return self
                .publish(topic, Response::<NoArgs>::error(rid, e).to_json())
                .await;
        }
        if args.module == "disks" && self.disks.is_none() {
            // Every agent answers `messaging`; only disk providers answer `disks`.
            return;
        }
        if self.benchmark_running.swap(true, Ordering::SeqCst) {
            let e = ErrorBody::new(ErrorCode::Busy, "a benchmark is already running");
            return self
                .publish(topic, Response::<NoArgs>::error(rid, e).to_json())
                .await;
        }
        let started = BenchmarkReply {
            module: args.module.clone(),
            figures: Default::default(),
        };
        self.publish(
            topic.clone(),
            Response::with_status(rid.clone(), Status::Started, started).to_json(),
        )
        .await;
        let result = match args.module.as_str() {
            "messaging" => self.bench_messaging().await,
            _ => self.bench_disks().await,
        };
        self.benchmark_running.store(false, Ordering::SeqCst);
        let body = match result {
            Ok(figures) => Response::with_status(
                rid,
                Status::Finished,
                BenchmarkReply {
                    module: args.module,
                    figures,
                },
            )
            .to_json(),
            Err(e) => Response::<NoArgs>::error(rid, e).to_json(),
        };
        self.publish(topic, body).await;
    }

    /// Round trips over the channel: PINGREQ → PINGRESP through the Dom0 link and the broker.
    async fn bench_messaging(&self) -> Result<std::collections::BTreeMap<String, f64>, ErrorBody> {
        const N: usize = 100;
        let mut samples = Vec::with_capacity(N);
        for _ in 0..N {
            match tokio::time::timeout(Duration::from_secs(5), self.uplink.hub.ping()).await {
                Ok(Some(d)) => samples.push(d),
                Ok(None) => {
                    return Err(ErrorBody::new(ErrorCode::Internal, "no session with Dom0"));
                }
                Err(_) => return Err(ErrorBody::new(ErrorCode::Timeout, "no PINGRESP within 5 s")),
            }
        }
        Ok(BenchmarkReply::round_trips(&mut samples).figures)
    }

    /// Read throughput of the first disk: reads its files, at most 256 MiB.
    async fn bench_disks(&self) -> Result<std::collections::BTreeMap<String, f64>, ErrorBody> {
        let d = self.disks()?;
        self.blocking(move || {
            let disk = d
                .list()
                .ok()
                .and_then(|l| l.into_iter().next())
                .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, "no disk to measure"))?;
            let dir = d.open(&disk.id).map_err(fs_error)?;
            let (files, _) = fsops::list(&dir, 10_000)
                .map_err(|e| ErrorBody::new(ErrorCode::Io, e.to_string()))?;
            let t0 = Instant::now();
            let mut bytes = 0u64;
            for f in files
                .iter()
                .filter(|f| f.kind == topics::payload::FileKind::File)
            {
                if bytes >= 256 * 1024 * 1024 {
                    break;
                }
                if let Ok((mut file, _)) = fsops::open_regular(&dir, Path::new(&f.path)) {
                    bytes += std::io::copy(&mut file, &mut std::io::sink()).unwrap_or(0);
                }
            }
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            Ok([
                (
                    "read_mb_per_s".to_owned(),
                    (bytes as f64 / secs / 1e6 * 10.0).round() / 10.0,
                ),
                ("bytes".to_owned(), bytes as f64),
            ]
            .into())
        })
        .await
    }
}
