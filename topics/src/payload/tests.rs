use super::*;
use serde_json::json;
use std::collections::BTreeSet;

/// Every object key path in a JSON value (`files[].type`), to compare field names.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                key_paths(v, &p, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                key_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    key_paths(v, "", &mut out);
    out
}

/// Decodes `example` as `T`, encodes it back, and checks the field names are the same.
fn round_trip<T: Serialize + DeserializeOwned + fmt::Debug>(example: Value) {
    let bytes = example.to_string();
    let typed: T = decode(bytes.as_bytes()).unwrap_or_else(|e| panic!("{example}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        keys(&back),
        keys(&example),
        "field names of {example} vs {back}"
    );
    assert_eq!(back, example, "values survive the round trip");
}

// The note's examples, transcribed to JSON (its single quotes made double, its two `;` typos made `,`,
// and `'type': '[file|folder]'` given one of its two values).
#[test]
fn note_command_payloads() {
    round_trip::<NoArgs>(json!({}));
    round_trip::<ListFilesArgs>(json!({ "disk": "identifier" }));
    round_trip::<ReadFileArgs>(json!({ "source_disk": "nom", "filepath": "path" }));
    round_trip::<CopyFileArgs>(
        json!({ "source_disk": "nom", "filepath": "path", "target_disk": "nom" }),
    );
    round_trip::<RemoveFileArgs>(json!({ "disk": "nom", "filepath": "path" }));
    round_trip::<BenchmarkArgs>(json!({ "module": "" }));
    round_trip::<FootprintArgs>(json!({ "disk": "nom", "filepath": "path" }));
    round_trip::<CreateFileArgs>(
        json!({ "disk": "nom", "filepath": "path", "data": "Y29udGVudQ==" }),
    );
}

#[test]
fn note_reply_payloads() {
    round_trip::<ListDisksReply>(json!({ "disks": [ { "label": "nom", "id": "identifier" } ] }));
    round_trip::<ListFilesReply>(json!({
        "disk": "identifier",
        "files": [ { "path": "path", "size": 0, "name": "", "type": "file" },
                   { "path": "dir", "size": 0, "name": "dir", "type": "folder" } ]
    }));
    round_trip::<FootprintReply>(json!({ "footprint": "xxxx" }));
    round_trip::<DiscoverReply>(json!({ "components": [ { "id": "", "label": "", "type": "" } ] }));
    for status in ["ok", "error", "started", "finished"] {
        let s: Status = serde_json::from_value(json!(status)).unwrap();
        assert_eq!(serde_json::to_value(s).unwrap(), json!(status));
    }
    // `{ 'status': 'ok|error' }` as a whole response.
    let r: Response<StatusOnly> = decode_response(br#"{"status":"ok"}"#).unwrap();
    assert_eq!(r, Response::ok(None, StatusOnly {}));
    assert_eq!(r.to_json(), br#"{"status":"ok"}"#);
    let r: Response<ReadFileReply> = decode_response(br#"{"status":"ok"}"#).unwrap();
    assert_eq!(r.result, Ok(ReadFileReply::default()));
    let r: Response<BenchmarkReply> = decode_response(br#"{"status":"started"}"#).unwrap();
    assert_eq!(r.status, Status::Started);
}

#[test]
fn note_notification_payloads() {
    round_trip::<NewFileEvent>(json!({ "disk": "", "filepath": "path", "size_in_bytes": 0 }));
    round_trip::<ErrorEvent>(
        json!({ "module": "", "datetime": "", "level": 0, "description": "" }),
    );
}

#[test]
fn request_envelope_round_trip() {
    let req = Request::new(
        VmId::parse("vm-gui").unwrap(),
        Some(RequestId::parse("42").unwrap()),
        ListFilesArgs {
            disk: "usb0".into(),
        },
    );
    let bytes = req.to_json();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        v,
        json!({ "disk": "usb0", "sender": "vm-gui", "request_id": "42" })
    );
    assert_eq!(decode_request::<ListFilesArgs>(&bytes).unwrap(), req);
    let env = decode_envelope(&bytes).unwrap();
    assert_eq!(env.sender.as_str(), "vm-gui");
    assert_eq!(env.request_id.unwrap().as_str(), "42");
}

#[test]
fn response_round_trip_and_error_shape() {
    let id = Some(RequestId::parse("r-1").unwrap());
    let ok = Response::ok(
        id.clone(),
        ListDisksReply {
            disks: vec![Disk {
                label: "USB".into(),
                id: "usb0".into(),
            }],
        },
    );
    let v: Value = serde_json::from_slice(&ok.to_json()).unwrap();
    assert_eq!(
        v,
        json!({ "status": "ok", "request_id": "r-1", "disks": [ { "label": "USB", "id": "usb0" } ] })
    );
    assert_eq!(
        decode_response::<ListDisksReply>(&ok.to_json()).unwrap(),
        ok
    );

    let err: Response<ListDisksReply> =
        Response::error(id, ErrorBody::new(ErrorCode::NotFound, "no disk `x`"));
    let v: Value = serde_json::from_slice(&err.to_json()).unwrap();
    assert_eq!(
        v,
        json!({ "status": "error", "request_id": "r-1", "error": { "code": "not_found", "message": "no disk `x`" } })
    );
    assert_eq!(
        decode_response::<ListDisksReply>(&err.to_json()).unwrap(),
        err
    );
}

#[test]
fn error_codes_are_stable_strings() {
    for code in ErrorCode::ALL {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
    }
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    for required in [
        "not_found",
        "invalid_argument",
        "forbidden",
        "io",
        "busy",
        "unsupported",
    ] {
        assert!(names.contains(&required), "{required}");
    }
}

#[test]
fn unknown_fields_are_tolerated() {
    let r: Request<ListFilesArgs> =
        decode_request(br#"{"disk":"usb0","sender":"vm-gui","extra":{"x":[1,2]},"v":2}"#).unwrap();
    assert_eq!(r.args.disk, "usb0");
    let d: ListDisksReply =
        decode(br#"{"disks":[{"label":"a","id":"b","fs":"vfat"}],"total":1}"#).unwrap();
    assert_eq!(d.disks.len(), 1);
}

fn missing(f: &str) -> PayloadError {
    PayloadError::MissingField(f.into())
}

/// (payload, expected error; for InvalidField only the field is compared)
#[test]
fn invalid_requests_table() {
    type Decoder = fn(&[u8]) -> Result<(), PayloadError>;
    fn lf(b: &[u8]) -> Result<(), PayloadError> {
        decode_request::<ListFilesArgs>(b).map(|_| ())
    }
    fn cf(b: &[u8]) -> Result<(), PayloadError> {
        decode_request::<CreateFileArgs>(b).map(|_| ())
    }
    fn cp(b: &[u8]) -> Result<(), PayloadError> {
        decode_request::<CopyFileArgs>(b).map(|_| ())
    }
    let field = |f: &str| PayloadError::InvalidField {
        field: f.into(),
        message: String::new(),
    };
    let rows: Vec<(Decoder, &[u8], PayloadError)> = vec![
        (lf, b"", PayloadError::NotJson(String::new())),
        (lf, b"{", PayloadError::NotJson(String::new())),
        (lf, b"\xff\xfe", PayloadError::NotJson(String::new())),
        (lf, b"[1,2]", PayloadError::NotObject),
        (lf, b"\"disk\"", PayloadError::NotObject),
        (lf, b"null", PayloadError::NotObject),
        (lf, br#"{"disk":"usb0"}"#, missing("sender")),
        (lf, br#"{"disk":"usb0","sender":null}"#, missing("sender")),
        (lf, br#"{"sender":"vm-gui"}"#, missing("disk")),
        (lf, br#"{"disk":5,"sender":"vm-gui"}"#, field("disk")),
        (lf, br#"{"disk":["a"],"sender":"vm-gui"}"#, field("disk")),
        (lf, br#"{"disk":"a","sender":7}"#, field("sender")),
        (lf, br#"{"disk":"a","sender":"VM-GUI"}"#, field("sender")),
        (lf, br#"{"disk":"a","sender":"vm/gui"}"#, field("sender")),
        (lf, br#"{"disk":"a","sender":""}"#, field("sender")),
        (
            lf,
            br#"{"disk":"a","sender":"vm-gui","request_id":5}"#,
            field("request_id"),
        ),
        (
            lf,
            br#"{"disk":"a","sender":"vm-gui","request_id":""}"#,
            field("request_id"),
        ),
        (
            lf,
            br#"{"disk":"a","sender":"vm-gui","request_id":"a b"}"#,
            field("request_id"),
        ),
        (
            lf,
            format!(
                r#"{{"disk":"a","sender":"vm-gui","request_id":"{}"}}"#,
                "x".repeat(65)
            )
            .leak()
            .as_bytes(),
            field("request_id"),
        ),
        (
            cf,
            br#"{"disk":"a","filepath":"f","sender":"vm-gui"}"#,
            missing("data"),
        ),
        (
            cf,
            br#"{"disk":"a","filepath":"f","data":"x","overwrite":"yes","sender":"vm-gui"}"#,
            field("overwrite"),
        ),
        (
            cp,
            br#"{"source_disk":"a","filepath":"f","sender":"vm-gui"}"#,
            missing("target_disk"),
        ),
        (
            cp,
            br#"{"source_disk":"a","filepath":1.5,"target_disk":"b","sender":"vm-gui"}"#,
            field("filepath"),
        ),
    ];
    for (decoder, payload, expected) in rows {
        let got = decoder(payload).expect_err(&String::from_utf8_lossy(payload));
        match (&expected, &got) {
            (
                PayloadError::InvalidField { field: f, .. },
                PayloadError::InvalidField { field: g, message },
            ) => {
                assert_eq!(f, g, "payload {}", String::from_utf8_lossy(payload));
                assert!(!message.is_empty());
                assert!(
                    got.to_string().contains(&format!("`{f}`")),
                    "error names the field: {got}"
                );
            }
            (PayloadError::NotJson(_), PayloadError::NotJson(_)) => {}
            _ => assert_eq!(
                got,
                expected,
                "payload {}",
                String::from_utf8_lossy(payload)
            ),
        }
    }
}

#[test]
fn invalid_replies_and_notifications_table() {
    let rows: Vec<(Result<(), PayloadError>, PayloadError)> = vec![
        (
            decode_response::<ListDisksReply>(br#"{"disks":[]}"#).map(|_| ()),
            missing("status"),
        ),
        (
            decode_response::<ListDisksReply>(br#"{"status":"fine","disks":[]}"#).map(|_| ()),
            PayloadError::InvalidField {
                field: "status".into(),
                message: String::new(),
            },
        ),
        (
            decode_response::<ListDisksReply>(br#"{"status":"error"}"#).map(|_| ()),
            missing("error"),
        ),
        (
            decode_response::<ListDisksReply>(br#"{"status":"error","error":{"message":"m"}}"#)
                .map(|_| ()),
            missing("error.code"),
        ),
        (
            decode_response::<ListDisksReply>(
                br#"{"status":"error","error":{"code":"oops","message":"m"}}"#,
            )
            .map(|_| ()),
            PayloadError::InvalidField {
                field: "error.code".into(),
                message: String::new(),
            },
        ),
        (
            decode_response::<ListDisksReply>(br#"{"status":"ok"}"#).map(|_| ()),
            missing("disks"),
        ),
        (
            decode::<ListDisksReply>(br#"{"disks":[{"label":"a"}]}"#).map(|_| ()),
            missing("disks[0].id"),
        ),
        (
            decode::<ListFilesReply>(
                br#"{"disk":"d","files":[{"path":"p","size":-1,"name":"n","type":"file"}]}"#,
            )
            .map(|_| ()),
            PayloadError::InvalidField {
                field: "files[0].size".into(),
                message: String::new(),
            },
        ),
        (
            decode::<ListFilesReply>(
                br#"{"disk":"d","files":[{"path":"p","size":1,"name":"n","type":"link"}]}"#,
            )
            .map(|_| ()),
            PayloadError::InvalidField {
                field: "files[0].type".into(),
                message: String::new(),
            },
        ),
        (
            decode::<NewFileEvent>(br#"{"disk":"d","filepath":"p","size_in_bytes":"12"}"#)
                .map(|_| ()),
            PayloadError::InvalidField {
                field: "size_in_bytes".into(),
                message: String::new(),
            },
        ),
        (
            decode::<ErrorEvent>(br#"{"module":"m","datetime":"d","level":300,"description":"x"}"#)
                .map(|_| ()),
            PayloadError::InvalidField {
                field: "level".into(),
                message: String::new(),
            },
        ),
        (
            decode::<ErrorEvent>(br#"{"module":"m","datetime":"d","level":3}"#).map(|_| ()),
            missing("description"),
        ),
    ];
    for (i, (got, expected)) in rows.into_iter().enumerate() {
        let got = got.expect_err(&format!("row {i}"));
        match (&expected, &got) {
            (
                PayloadError::InvalidField { field: f, .. },
                PayloadError::InvalidField { field: g, .. },
            ) => {
                assert_eq!(f, g, "row {i}: {got}")
            }
            _ => assert_eq!(got, expected, "row {i}"),
        }
    }
}

#[test]
fn quantiles_and_round_trip_figures() {
    let sorted: Vec<u32> = (0..100).collect();
    assert_eq!(quantile(&sorted, 0.5), Some(50));
    assert_eq!(quantile(&sorted, 0.99), Some(99));
    assert_eq!(quantile(&sorted, 1.0), Some(99));
    assert_eq!(quantile(&[7u32], 0.99), Some(7));
    assert_eq!(quantile::<u32>(&[], 0.5), None);
    let mut samples: Vec<std::time::Duration> = (1..=100)
        .rev()
        .map(std::time::Duration::from_micros)
        .collect();
    let r = BenchmarkReply::round_trips(&mut samples);
    assert_eq!(r.module, "messaging");
    assert_eq!(r.figures["round_trip_p50_us"], 51.0);
    assert_eq!(r.figures["round_trip_p99_us"], 100.0);
    assert_eq!(r.figures["samples"], 100.0);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_envelope(&bytes);
            let _ = decode_request::<CreateFileArgs>(&bytes);
            let _ = decode_response::<ListFilesReply>(&bytes);
            let _ = decode::<ErrorEvent>(&bytes);
        }

        #[test]
        fn decoding_json_like_text_never_panics(s in r#"\{("[a-z_]{1,12}":("[ -~]{0,8}"|-?[0-9]{1,4}|null|true|\[\]|\{\}),?){0,6}\}"#) {
            let _ = decode_request::<CopyFileArgs>(s.as_bytes());
            let _ = decode_response::<DiscoverReply>(s.as_bytes());
        }
    }
}

#[test]
fn a_requests_deadline_comes_from_its_patience_on_dom0s_clock() {
    let now = 1_000_000;
    let default = DEFAULT_REQUEST_TIMEOUT.as_millis() as u64;
    let max = MAX_REQUEST_TIMEOUT.as_millis() as u64;
    // (fields, deadline)
    let table = [
        (json!({}), now + default),
        (json!({"timeout_ms": 2500}), now + 2500),
        (json!({"timeout_ms": 0}), now + default),
        (json!({"timeout_ms": -5}), now + default),
        (json!({"timeout_ms": "10"}), now + default),
        (json!({"timeout_ms": u64::MAX}), now + max),
        (json!({"timeout_ms": 2500.0}), now + default),
    ];
    for (f, deadline) in table {
        let text = f.to_string();
        let fields = crate::raw_object::RawObject::parse(text.as_bytes()).unwrap();
        assert_eq!(deadline_for(&fields, now), deadline, "{f}");
    }
}

#[test]
fn a_request_expires_only_after_its_deadline() {
    let with = |d: Value| json!({"sender": "vm-gui", "deadline_ms": d}).to_string();
    assert!(
        !expired(with(json!(1000)).as_bytes(), 1000),
        "at the deadline"
    );
    assert!(expired(with(json!(1000)).as_bytes(), 1001));
    assert!(!expired(br#"{"sender":"vm-gui"}"#, u64::MAX), "none: never");
    assert!(
        !expired(with(json!("1000")).as_bytes(), 5000),
        "not a number: none"
    );
    assert!(!expired(b"not json deadline_ms", 5000));
}
