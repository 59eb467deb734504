//! Table tests of the multiplexer: client requests and Dom0's answers in, actions out.

use super::*;

const Q0: QoS = QoS::AtMostOnce;
const Q1: QoS = QoS::AtLeastOnce;

fn sub(f: &str) -> Vec<(String, QoS)> {
    vec![(f.to_owned(), Q1)]
}

fn up(f: &str) -> Action {
    Action::SubscribeUp(f.to_owned())
}

#[test]
fn first_subscriber_subscribes_upstream_and_waits_for_dom0() {
    let mut m = Mux::new();
    m.attach(1);
    assert_eq!(m.subscribe(1, 10, sub("app/#")), vec![up("app/#")]);
    // Dom0 grants: the client gets its SUBACK.
    assert_eq!(
        m.on_suback(vec![("app/#".into(), Some(Q1))]),
        vec![Action::SubAck {
            client: 1,
            pkid: 10,
            codes: vec![Some(Q1)]
        }]
    );
    // A second client on the same filter: no upstream traffic, answered at once.
    m.attach(2);
    assert_eq!(
        m.subscribe(2, 5, vec![("app/#".into(), Q0)]),
        vec![Action::SubAck {
            client: 2,
            pkid: 5,
            codes: vec![Some(Q0)]
        }]
    );
    assert_eq!(m.upstream_filters(), ["app/#"]);
}

#[test]
fn a_refusal_goes_to_the_client_that_asked_and_no_other() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(1, 1, sub("app/x"));
    m.on_suback(vec![("app/x".into(), Some(Q1))]);
    // Client 2 asks for a filter Dom0 refuses, together with one it allows.
    let actions = m.subscribe(2, 7, vec![("secret/#".into(), Q1), ("app/x".into(), Q1)]);
    assert_eq!(actions, vec![up("secret/#")]);
    assert_eq!(
        m.on_suback(vec![("secret/#".into(), None)]),
        vec![
            Action::ForgetUp("secret/#".into()),
            Action::SubAck {
                client: 2,
                pkid: 7,
                codes: vec![None, Some(Q1)]
            }
        ]
    );
    assert_eq!(m.upstream_filters(), ["app/x"]);
    assert_eq!(m.deliver("app/x", Q1), vec![(1, Q1), (2, Q1)]);
    assert!(m.deliver("secret/a", Q1).is_empty());
    // Asking again asks Dom0 again (its policy may have been reloaded).
    assert_eq!(m.subscribe(1, 2, sub("secret/#")), vec![up("secret/#")]);
}

#[test]
fn dollar_and_malformed_filters_are_refused_here() {
    let mut m = Mux::new();
    m.attach(1);
    for f in ["$SYS/#", "a/#/b", "a+", "", "a//b"] {
        assert_eq!(
            m.subscribe(1, 3, sub(f)),
            vec![Action::SubAck {
                client: 1,
                pkid: 3,
                codes: vec![None]
            }],
            "{f:?}"
        );
    }
    assert!(m.upstream_filters().is_empty());
}

#[test]
fn overlapping_filters_of_one_client_deliver_one_copy() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(
        1,
        1,
        vec![("app/#".into(), Q0), ("app/+/status".into(), Q1)],
    );
    m.subscribe(2, 1, sub("app/sys-usb/status"));
    m.on_suback(vec![
        ("app/#".into(), Some(Q1)),
        ("app/+/status".into(), Some(Q1)),
        ("app/sys-usb/status".into(), Some(Q1)),
    ]);
    let rows: [(&str, QoS, Vec<(ClientId, QoS)>); 4] = [
        ("app/sys-usb/status", Q1, vec![(1, Q1), (2, Q1)]),
        ("app/sys-usb/status", Q0, vec![(1, Q0), (2, Q0)]),
        ("app/other", Q1, vec![(1, Q0)]),
        ("system/x/y/request", Q1, vec![]),
    ];
    for (topic, qos, expected) in rows {
        assert_eq!(m.deliver(topic, qos), expected, "{topic} at {qos:?}");
    }
}

#[test]
fn the_last_one_out_unsubscribes_upstream() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(1, 1, sub("app/#"));
    m.subscribe(2, 1, sub("app/#"));
    m.on_suback(vec![("app/#".into(), Some(Q1))]);
    assert_eq!(
        m.unsubscribe(1, 9, &["app/#".into()]),
        vec![Action::UnsubAck { client: 1, pkid: 9 }]
    );
    assert_eq!(
        m.deliver("app/a", Q1),
        vec![(2, Q1)],
        "the other keeps receiving"
    );
    assert_eq!(m.detach(2), vec![Action::UnsubscribeUp("app/#".into())]);
    assert!(m.upstream_filters().is_empty());
    assert_eq!(m.clients(), 1);
}

#[test]
fn a_client_that_leaves_before_dom0_answers_is_forgotten() {
    let mut m = Mux::new();
    m.attach(1);
    m.subscribe(1, 4, sub("app/#"));
    assert_eq!(m.detach(1), vec![Action::UnsubscribeUp("app/#".into())]);
    assert!(m.on_suback(vec![("app/#".into(), Some(Q1))]).is_empty());
    // And one that unsubscribes while waiting gets its SUBACK all the same (refused: gone).
    m.attach(2);
    m.subscribe(2, 5, sub("app/#"));
    m.unsubscribe(2, 6, &["app/#".into()]);
    assert_eq!(
        m.on_suback(vec![("app/#".into(), Some(Q1))]),
        vec![Action::SubAck {
            client: 2,
            pkid: 5,
            codes: vec![None]
        }]
    );
}

#[test]
fn subacks_wait_for_every_filter_and_keep_their_order() {
    let mut m = Mux::new();
    m.attach(1);
    m.subscribe(1, 1, vec![("a".into(), Q1), ("b".into(), Q1)]);
    m.subscribe(1, 2, sub("a"));
    assert_eq!(
        m.on_suback(vec![("a".into(), Some(Q1))]),
        vec![
            // pkid 2 only needed `a`; pkid 1 still waits for `b`.
            Action::SubAck {
                client: 1,
                pkid: 2,
                codes: vec![Some(Q1)]
            }
        ]
    );
    assert_eq!(
        m.on_suback(vec![("b".into(), Some(Q0))]),
        vec![Action::SubAck {
            client: 1,
            pkid: 1,
            codes: vec![Some(Q1), Some(Q0)]
        }]
    );
}

#[test]
fn a_renewal_refused_after_a_reload_stops_delivery() {
    let mut m = Mux::new();
    m.attach(1);
    m.subscribe(1, 1, sub("app/#"));
    m.on_suback(vec![("app/#".into(), Some(Q1))]);
    assert_eq!(m.deliver("app/a", Q1).len(), 1);
    // After a reconnect, Dom0 refuses the renewed subscription.
    assert_eq!(
        m.on_suback(vec![("app/#".into(), None)]),
        vec![Action::ForgetUp("app/#".into())]
    );
    assert!(m.deliver("app/a", Q1).is_empty());
}

#[test]
fn local_qos1_publishes_are_acknowledged_when_dom0_acknowledges() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.published(1, 77, 3);
    m.published(2, 77, 4);
    assert_eq!(
        m.acked(4),
        Some(Action::PubAck {
            client: 2,
            pkid: 77
        })
    );
    assert_eq!(m.acked(4), None, "once");
    // A client that left gets nothing.
    m.detach(1);
    assert_eq!(m.acked(3), None);
}

#[test]
fn filters_covered_by_a_granted_one_are_not_subscribed_again() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(1, 1, sub("app/#"));
    m.on_suback(vec![("app/#".into(), Some(Q1))]);
    // Covered: granted here, nothing upstream, one copy whatever the broker does.
    assert_eq!(
        m.subscribe(2, 1, sub("app/sys-usb/status")),
        vec![Action::SubAck {
            client: 2,
            pkid: 1,
            codes: vec![Some(Q1)]
        }]
    );
    assert_eq!(m.upstream_filters(), ["app/#"]);
    // The cover's client leaves: the cover stays upstream for the filter under it (swapping them
    // would lose or duplicate messages at the broker), delivered to nobody but through it.
    assert!(m.detach(1).is_empty());
    assert_eq!(m.upstream_filters(), ["app/#"]);
    assert_eq!(m.deliver("app/sys-usb/status", Q1), vec![(2, Q1)]);
    assert!(m.deliver("app/sys-usb/other", Q1).is_empty());
    // A new client on the cover gets it at once.
    m.attach(3);
    assert_eq!(
        m.subscribe(3, 1, sub("app/#")),
        vec![Action::SubAck {
            client: 3,
            pkid: 1,
            codes: vec![Some(Q1)]
        }]
    );
    m.detach(3);
    // The last filter under it goes: the cover goes too.
    assert_eq!(m.detach(2), vec![Action::UnsubscribeUp("app/#".into())]);
    assert!(m.upstream_filters().is_empty());
}

#[test]
fn a_kept_cover_refused_by_a_reload_hands_over_to_what_it_covered() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(1, 1, sub("app/#"));
    m.on_suback(vec![("app/#".into(), Some(Q1))]);
    m.subscribe(2, 1, sub("app/a/status"));
    assert!(m.detach(1).is_empty());
    assert_eq!(
        m.on_suback(vec![("app/#".into(), None)]),
        vec![Action::ForgetUp("app/#".into()), up("app/a/status")]
    );
    assert_eq!(m.upstream_filters(), ["app/a/status"]);
}

#[test]
fn a_kept_cover_under_a_new_cover_goes() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.attach(3);
    m.subscribe(1, 1, sub("app/a/#"));
    m.on_suback(vec![("app/a/#".into(), Some(Q1))]);
    m.subscribe(2, 1, sub("app/a/status"));
    assert!(m.detach(1).is_empty());
    // A wider cover, granted: the kept one is unsubscribed and forgotten.
    assert_eq!(m.subscribe(3, 1, sub("app/#")), vec![up("app/#")]);
    let after = m.on_suback(vec![("app/#".into(), Some(Q1))]);
    assert!(
        after.contains(&Action::UnsubscribeUp("app/a/#".into())),
        "{after:?}"
    );
    assert_eq!(m.upstream_filters(), ["app/#"]);
    // Client 3 leaves: app/# is kept for app/a/status; app/a/# does not come back.
    assert!(m.detach(3).is_empty());
    assert_eq!(m.upstream_filters(), ["app/#"]);
    assert_eq!(m.detach(2), vec![Action::UnsubscribeUp("app/#".into())]);
}

#[test]
fn a_new_cover_replaces_what_it_covers_upstream_once_granted() {
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    m.subscribe(1, 1, sub("app/a/status"));
    m.on_suback(vec![("app/a/status".into(), Some(Q1))]);
    // Overlapping but not covering: both upstream.
    assert_eq!(
        m.subscribe(2, 1, sub("app/+/status")),
        vec![up("app/+/status")]
    );
    // Granted: it covers app/a/status, which leaves the upstream set.
    assert_eq!(
        m.on_suback(vec![("app/+/status".into(), Some(Q1))]),
        vec![
            Action::UnsubscribeUp("app/a/status".into()),
            Action::SubAck {
                client: 2,
                pkid: 1,
                codes: vec![Some(Q1)]
            }
        ]
    );
    assert_eq!(m.upstream_filters(), ["app/+/status"]);
    // Refused later (a policy reload): what it covered comes back upstream.
    assert_eq!(
        m.on_suback(vec![("app/+/status".into(), None)]),
        vec![Action::ForgetUp("app/+/status".into()), up("app/a/status")]
    );
    assert_eq!(m.deliver("app/a/status", Q1), vec![(1, Q1)]);
}

/// Found by `apps::overlapping_subscriptions_embedded` on a loaded machine: a client subscribing
/// `app/#` and `app/+/status` in one SUBSCRIBE got both subscribed upstream; until the covered one
/// was unsubscribed again (once `app/#` was granted), rumqttd sent one copy per filter and the
/// client received a message twice. Now the covered filter waits for the cover's grant, in either
/// order, and goes upstream only if the cover is refused.
#[test]
fn a_cover_and_what_it_covers_asked_together_go_upstream_once() {
    for filters in [
        vec![("app/#".to_owned(), Q1), ("app/+/status".to_owned(), Q1)],
        vec![("app/+/status".to_owned(), Q1), ("app/#".to_owned(), Q1)],
    ] {
        let mut m = Mux::new();
        m.attach(1);
        assert_eq!(m.subscribe(1, 3, filters.clone()), vec![up("app/#")]);
        assert_eq!(m.upstream_filters(), ["app/#"]);
        // Granted: both codes at once, in the order asked, and nothing else upstream.
        assert_eq!(
            m.on_suback(vec![("app/#".into(), Some(Q1))]),
            vec![Action::SubAck {
                client: 1,
                pkid: 3,
                codes: vec![Some(Q1), Some(Q1)]
            }]
        );
        assert_eq!(m.upstream_filters(), ["app/#"]);
        assert_eq!(m.deliver("app/x/status", Q1), vec![(1, Q1)]);
    }
    // The cover refused: what it covered goes upstream and is answered by its own grant.
    let mut m = Mux::new();
    m.attach(1);
    m.subscribe(
        1,
        4,
        vec![("app/#".to_owned(), Q1), ("app/+/status".to_owned(), Q1)],
    );
    assert_eq!(
        m.on_suback(vec![("app/#".into(), None)]),
        vec![Action::ForgetUp("app/#".into()), up("app/+/status")]
    );
    assert_eq!(
        m.on_suback(vec![("app/+/status".into(), Some(Q1))]),
        vec![Action::SubAck {
            client: 1,
            pkid: 4,
            codes: vec![None, Some(Q1)]
        }]
    );
    // A second client asking for the covered filter while the cover waits for Dom0 waits too.
    let mut m = Mux::new();
    m.attach(1);
    m.attach(2);
    assert_eq!(m.subscribe(1, 5, sub("app/#")), vec![up("app/#")]);
    assert_eq!(m.subscribe(2, 6, sub("app/x/status")), vec![]);
    assert_eq!(
        m.on_suback(vec![("app/#".into(), Some(Q1))]),
        vec![
            Action::SubAck {
                client: 1,
                pkid: 5,
                codes: vec![Some(Q1)]
            },
            Action::SubAck {
                client: 2,
                pkid: 6,
                codes: vec![Some(Q1)]
            }
        ]
    );
    assert_eq!(m.upstream_filters(), ["app/#"]);
}
