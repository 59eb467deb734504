//! The I/O driver of one VM link: attaches to the channel socket (retrying with backoff), moves
//! bytes between the socket, the [`Session`] buffers and the broker connection, and carries out the
//! session's effects. One task per VM; a VM's trouble never blocks another's task.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use tokio::time::{sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use topics::backoff::Backoff;
use topics::payload::LinkState;
use topics::vm::VmId;
use tracing::Instrument;

use crate::broker::{self, BrokerRead, BrokerWrite};
use crate::policy::Policy;
use crate::session::{Effect, Limits, NamesAParty, Session};
use crate::supervision::{Event, LinkStats, Supervision};

/// Size of the read buffers (guest and broker sides).
const READ_BUF: usize = 64 * 1024;

/// What every link shares.
#[derive(Debug)]
pub struct LinkContext {
    pub broker: broker::LinkRoute,
    pub limits: Limits,
    /// The policy in force; a reload sends the new one (every link applies it at once).
    pub policy: watch::Receiver<Arc<Policy>>,
    pub supervision: Supervision,
    /// How long opening a broker connection may take before the guest is told "server unavailable".
    pub connect_timeout: Duration,
}

/// Runs a VM's link until `stop` turns true. Its log lines carry the VM in a `link` span.
pub async fn run(vm: VmId, path: PathBuf, ctx: Arc<LinkContext>, stop: CancellationToken) {
    let span = tracing::info_span!("link", vm = %vm);
    attach_loop(vm, path, ctx, stop).instrument(span).await
}

async fn attach_loop(vm: VmId, path: PathBuf, ctx: Arc<LinkContext>, stop: CancellationToken) {
    let stats = ctx.supervision.register(&vm);
    let mut held = Held {
        policy: ctx.policy.clone(),
        broker: Broker::default(),
    };
    let mut backoff = Backoff::new();
    let mut attempts = 0u64;
    while !stop.is_cancelled() {
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                attempts = 0;
                tracing::info!(path = %path.display(), "attached to channel");
                emit_state(&ctx, &vm, LinkState::Linked, None);
                let started = Instant::now();
                let rules = held.policy.borrow_and_update().rules_for(&vm);
                // A client id names another party when it is Dom0, a VM Dom0 links, or a VM the
                // policy names.
                let (known, named) = (ctx.supervision.clone(), ctx.policy.clone());
                let now = Instant::now();
                let mut s = Session::new(vm.clone(), ctx.limits.clone(), rules, now)
                    .with_epoch(now, epoch_ms())
                    .with_parties(NamesAParty(Arc::new(move |id: &str| {
                        id.eq_ignore_ascii_case(topics::vm::DOM0)
                            || known.knows(id)
                            || named.borrow().named_vms().any(|n| n == id)
                    })));
                let ended =
                    serve_attachment(&vm, &stats, &mut s, stream, &ctx, &mut held, &stop).await;
                held.broker.close();
                stats.add(&s.take_counters());
                let why = match ended {
                    Ok(never) => match never {},
                    Err(why) => why,
                };
                tracing::info!(reason = %why, "detached from channel");
                emit_state(&ctx, &vm, LinkState::Unlinked, Some(why));
                if started.elapsed() > Duration::from_secs(1) {
                    backoff.reset();
                }
            }
            Err(e) => {
                attempts += 1;
                // The backend may be restarting; say so once, then quietly.
                if attempts == 1 {
                    tracing::info!(path = %path.display(), error = %e, "channel socket not accepting; retrying with backoff");
                } else {
                    tracing::debug!(attempts, error = %e, "channel socket still not accepting");
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = sleep(delay) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// Dom0's wall clock, in milliseconds since the epoch.
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn emit_state(ctx: &LinkContext, vm: &VmId, state: LinkState, detail: Option<String>) {
    ctx.supervision.emit(Event::State {
        vm: vm.clone(),
        state,
        detail,
    });
}

/// `f`'s output when there is one (a broker connection, a deadline); never ready otherwise.
async fn or_never<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Room for the next read: 1 KiB at first (an idle link reads a few packets), [`READ_BUF`] once
/// a read has filled what there was.
fn room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(if buf.capacity() == 0 { 1024 } else { READ_BUF });
    }
}

/// What a link keeps across its attachments.
struct Held {
    /// The policy in force for this VM (a reload's new one is applied at once).
    policy: watch::Receiver<Arc<Policy>>,
    /// The broker connection of the session: one at a time, so that a new one follows the end of
    /// the previous one (see `Broker::open`).
    broker: Broker,
}

/// The broker connection of the session, while there is one.
#[derive(Default)]
struct Broker {
    read: Option<BrokerRead>,
    write: Option<BrokerWrite>,
    /// In process: the broker's side of the last connection, which ends after the connection is
    /// closed (it tells rumqttd's router of the departure).
    served: Option<tokio::task::JoinHandle<()>>,
}

/// How long opening a connection waits for the broker's side of the previous one to end.
const PREVIOUS_ENDS: Duration = Duration::from_secs(1);

impl Broker {
    /// Closes the connection (its broker side, in process, ends on the end of stream).
    fn close(&mut self) {
        self.read = None;
        self.write = None;
    }

    /// Opens a connection, once the previous one's broker side has ended: in process, a new
    /// connection under the same client id must reach rumqttd's router after the previous one's
    /// departure, or that departure (by connection slot) would end the new one.
    async fn open(&mut self, route: &broker::LinkRoute) -> std::io::Result<()> {
        self.close();
        if let Some(previous) = self.served.take() {
            let _ = timeout(PREVIOUS_ENDS, previous).await;
        }
        let (r, w, served) = route.open().await?;
        self.read = Some(r);
        self.write = Some(w);
        self.served = served;
        Ok(())
    }
}

/// Serves one attachment to the channel socket: it ends only with the reason it ended.
async fn serve_attachment(
    vm: &VmId,
    stats: &LinkStats,
    s: &mut Session,
    stream: UnixStream,
    ctx: &LinkContext,
    held: &mut Held,
    stop: &CancellationToken,
) -> Result<std::convert::Infallible, String> {
    let Held { policy, broker } = held;
    let (mut gr, mut gw) = stream.into_split();
    s.attach(Instant::now());
    broker.close();
    // Allocated as they are used: an idle link holds a few hundred bytes, a busy one READ_BUF.
    let mut guest_buf = BytesMut::new();
    let mut broker_buf = BytesMut::new();
    let mut pending: VecDeque<Effect> = VecDeque::new();
    loop {
        room(&mut guest_buf);
        room(&mut broker_buf);
        let deadline = s.next_deadline();
        let want_guest = s.wants_guest_input();
        let has_broker = broker.read.is_some();
        let effects = tokio::select! {
            _ = stop.cancelled() => return Err("service stopping".to_owned()),
            r = gr.read_buf(&mut guest_buf), if want_guest => match r {
                Ok(0) => return Err("channel socket closed by the backend".to_owned()),
                Ok(_) => {
                    s.set_parties(ctx.supervision.parties());
                    let effects = s.on_guest_input(&guest_buf, Instant::now());
                    guest_buf.clear();
                    effects
                }
                Err(e) => return Err(format!("channel read error: {e}")),
            },
            r = or_never(broker.read.as_mut().map(|r| r.read_buf(&mut broker_buf))), if has_broker => match r {
                Ok(n) if n > 0 => {
                    let effects = s.on_broker_input(&broker_buf, Instant::now());
                    broker_buf.clear();
                    effects
                }
                other => {
                    if let Err(e) = other {
                        tracing::info!(error = %e, "broker connection error");
                    }
                    broker.close();
                    s.broker_closed(Instant::now())
                }
            },
            r = gw.write(s.to_guest()), if !s.to_guest().is_empty() => match r {
                Ok(n) => { s.guest_written(n); Vec::new() }
                Err(e) => return Err(format!("channel write error: {e}")),
            },
            r = or_never(broker.write.as_mut().map(|w| w.write(s.to_broker()))), if has_broker && !s.to_broker().is_empty() => match r {
                Ok(n) => { s.broker_written(n); Vec::new() }
                Err(e) => {
                    tracing::info!(error = %e, "broker write error");
                    broker.close();
                    s.broker_closed(Instant::now())
                }
            },
            _ = or_never(deadline.map(|t| sleep_until(t.into()))) => s.on_tick(Instant::now()),
            r = policy.changed() => match r {
                Ok(()) => {
                    let rules = policy.borrow_and_update().rules_for(vm);
                    s.set_rules(rules, Instant::now())
                }
                Err(_) => return Err("service stopping".to_owned()),
            },
        };
        pending.extend(effects);
        stats.add(&s.take_counters());
        carry_out(vm, s, ctx, stop, broker, &mut pending).await?;
    }
}

/// Carries out the session's effects: opening and closing the broker connection, reporting.
/// Err: the service stops.
async fn carry_out(
    vm: &VmId,
    s: &mut Session,
    ctx: &LinkContext,
    stop: &CancellationToken,
    broker: &mut Broker,
    pending: &mut VecDeque<Effect>,
) -> Result<(), String> {
    while let Some(effect) = pending.pop_front() {
        match effect {
            Effect::OpenBroker => {
                let opened = tokio::select! {
                    r = timeout(ctx.connect_timeout, broker.open(&ctx.broker)) => r,
                    _ = stop.cancelled() => return Err("service stopping".to_owned()),
                };
                match opened {
                    Ok(Ok(())) => {
                        pending.extend(s.broker_connected(Instant::now()));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(broker = %ctx.broker, error = %e, "broker unreachable; guest told to retry");
                        s.broker_failed();
                    }
                    Err(_) => {
                        tracing::warn!(broker = %ctx.broker, "broker connection timed out; guest told to retry");
                        s.broker_failed();
                    }
                }
            }
            Effect::CloseBroker { flush } => {
                if let (true, Some(w)) = (flush, broker.write.as_mut()) {
                    let _ = timeout(Duration::from_secs(1), w.write_all(s.to_broker())).await;
                }
                broker.close();
                s.broker_released();
            }
            Effect::State(state, detail) => emit_state(ctx, vm, state, detail),
            Effect::Refused { topic, reason } => {
                ctx.supervision.emit(Event::Refused {
                    vm: vm.clone(),
                    topic,
                    reason,
                });
            }
        }
    }
    Ok(())
}
