#![allow(clippy::unwrap_used)]

use super::*;

const ID: &str = "0123456789abcdef0123456789abcdef";

fn id() -> RequestId {
    RequestId::parse(ID).unwrap()
}

fn answer(responder: Option<&str>, status: &str) -> Vec<u8> {
    let mut v = serde_json::json!({"status": status, "request_id": ID});
    if let Some(r) = responder {
        v["responder"] = r.into();
    }
    v.to_string().into_bytes()
}

fn at(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

#[test]
fn random_ids_are_32_hex_digits() {
    let a = RequestId::random([0xab; 16]);
    assert_eq!(a.as_str().len(), 32);
    assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(RequestId::parse(a.as_str()).is_ok());
    assert_ne!(RequestId::random([1; 16]), RequestId::random([2; 16]));
}

#[test]
fn responders_follow_the_destination() {
    use Responders::*;
    let table = [
        (Command::ListDisks, Some("sys-usb"), Named("sys-usb".into())),
        (Command::ListDisks, Some("Dom0"), Named("dom0".into())),
        (Command::ListDisks, None, First),
        (Command::Discover, None, Everyone),
        (Command::Benchmark, None, Everyone),
        (Command::Benchmark, Some("dom0"), Named("dom0".into())),
    ];
    for (c, d, want) in table {
        assert_eq!(Responders::for_request(c, d), want, "{c:?} {d:?}");
    }
}

/// Each row: what arrives (command of the topic, payload), and whether it is taken.
#[test]
fn a_named_question_takes_only_its_answer() {
    let t0 = Instant::now();
    let forged_id =
        serde_json::json!({"status":"ok","request_id":"vm-gui-1-1","responder":"sys-usb"})
            .to_string()
            .into_bytes();
    let rows: Vec<(Command, Vec<u8>, Result<(), Refusal>)> = vec![
        (
            Command::Discover,
            answer(Some("sys-usb"), "ok"),
            Err(Refusal::OtherCommand),
        ),
        (Command::ListDisks, forged_id, Err(Refusal::OtherRequest)),
        (
            Command::ListDisks,
            answer(Some("vm-evil"), "ok"),
            Err(Refusal::NotAsked("vm-evil".into())),
        ),
        (
            Command::ListDisks,
            answer(None, "ok"),
            Err(Refusal::NotAsked("dom0".into())),
        ),
        (
            Command::ListDisks,
            answer(Some("../x"), "ok"),
            Err(Refusal::BadResponder),
        ),
        (
            Command::ListDisks,
            b"not json".to_vec(),
            Err(Refusal::NotObject),
        ),
        (Command::ListDisks, answer(Some("sys-usb"), "ok"), Ok(())),
        (
            Command::ListDisks,
            answer(Some("sys-usb"), "ok"),
            Err(Refusal::Closed),
        ),
    ];
    let mut q = Question::new(
        Command::ListDisks,
        id(),
        Responders::Named("sys-usb".into()),
        None,
        t0,
    );
    for (i, (command, payload, want)) in rows.into_iter().enumerate() {
        let got = q.accept(command, &payload, at(t0, 1)).map(|_| ());
        assert_eq!(got, want, "row {i}");
    }
    assert!(q.is_done(at(t0, 1)));
    assert_eq!(q.answered(), 1);
}

#[test]
fn the_first_responder_is_the_only_one() {
    let t0 = Instant::now();
    let mut q = Question::new(Command::Benchmark, id(), Responders::First, None, t0);
    let a = q.accept(Command::Benchmark, &answer(Some("sys-usb"), "started"), t0);
    assert_eq!(
        a,
        Ok(Accepted {
            responder: "sys-usb".into(),
            last: false
        })
    );
    assert!(!q.is_done(t0));
    assert_eq!(
        q.accept(Command::Benchmark, &answer(Some("vm-gui"), "finished"), t0),
        Err(Refusal::NotAsked("vm-gui".into()))
    );
    assert_eq!(
        q.accept(Command::Benchmark, &answer(Some("sys-usb"), "started"), t0),
        Err(Refusal::Repeated("sys-usb".into()))
    );
    assert!(
        q.accept(Command::Benchmark, &answer(Some("sys-usb"), "finished"), t0)
            .unwrap()
            .last
    );
    assert!(q.is_done(t0));
}

#[test]
fn a_broadcast_takes_each_party_once_within_its_window() {
    let t0 = Instant::now();
    let mut q = Question::new(Command::Discover, id(), Responders::Everyone, None, t0);
    assert_eq!(q.next_deadline(), at(t0, 2000));
    for r in [None, Some("sys-usb"), Some("vm-gui")] {
        assert!(
            q.accept(Command::Discover, &answer(r, "ok"), at(t0, 10))
                .is_ok()
        );
    }
    assert_eq!(
        q.accept(
            Command::Discover,
            &answer(Some("sys-usb"), "ok"),
            at(t0, 20)
        ),
        Err(Refusal::Repeated("sys-usb".into()))
    );
    assert!(!q.is_done(at(t0, 1999)));
    assert!(q.is_done(at(t0, 2000)));
    assert_eq!(q.answered(), 3);
}

#[test]
fn a_broadcast_benchmark_waits_for_every_party_that_started() {
    let t0 = Instant::now();
    let mut q = Question::new(
        Command::Benchmark,
        id(),
        Responders::Everyone,
        Some(Duration::from_secs(20)),
        t0,
    );
    for r in ["dom0", "sys-usb", "vm-gui"] {
        q.accept(Command::Benchmark, &answer(Some(r), "started"), at(t0, 5))
            .unwrap();
    }
    q.accept(
        Command::Benchmark,
        &answer(Some("dom0"), "finished"),
        at(t0, 50),
    )
    .unwrap();
    // The window is over, two parties still run: the question waits for them, not for the window.
    assert!(!q.is_done(at(t0, 2500)));
    assert_eq!(q.next_deadline(), at(t0, 20_000));
    assert_eq!(q.pending().collect::<Vec<_>>(), ["sys-usb", "vm-gui"]);
    // A newcomer after the window is not taken.
    assert_eq!(
        q.accept(
            Command::Benchmark,
            &answer(Some("vm-late"), "started"),
            at(t0, 2600)
        ),
        Err(Refusal::NotAsked("vm-late".into()))
    );
    q.accept(
        Command::Benchmark,
        &answer(Some("sys-usb"), "finished"),
        at(t0, 3000),
    )
    .unwrap();
    q.accept(
        Command::Benchmark,
        &answer(Some("vm-gui"), "error"),
        at(t0, 3100),
    )
    .unwrap();
    assert!(q.is_done(at(t0, 3100)));
    assert_eq!(q.answered(), 3);
}

#[test]
fn a_question_ends_at_its_deadline() {
    let t0 = Instant::now();
    let q = Question::new(
        Command::ListDisks,
        id(),
        Responders::First,
        Some(Duration::from_millis(300)),
        t0,
    );
    assert_eq!(q.next_deadline(), at(t0, 300));
    assert!(!q.is_done(at(t0, 299)));
    assert!(q.is_done(at(t0, 300)));
    let mut q = q;
    assert_eq!(
        q.accept(
            Command::ListDisks,
            &answer(Some("sys-usb"), "ok"),
            at(t0, 301)
        ),
        Err(Refusal::Closed)
    );
}

#[test]
fn discover_patience_is_its_window() {
    let t0 = Instant::now();
    let q = Question::new(
        Command::Discover,
        id(),
        Responders::Everyone,
        Some(Duration::from_secs(5)),
        t0,
    );
    assert!(!q.is_done(at(t0, 4999)));
    assert!(q.is_done(at(t0, 5000)));
}
