//! Any bytes as a sequence of ring-buffer records (each prefixed by its length, u16 LE):
//! decoding ends in an event or a typed error, and whatever the events hold (thread names,
//! keys), every human line carries no raw control character and every JSON line parses.
#![no_main]

use detector_common::Event;
use detector_user::{
    engine::correlate::{Alert, Correlator, MissValue},
    process::container::HOST,
    report::{HumanSink, JsonSink, Sink},
    targets::python,
};
use libfuzzer_sys::fuzz_target;

fn check(alert: &Alert) {
    let mut human = Vec::new();
    HumanSink::new(&mut human).alert(alert, 1, &HOST, "cache").unwrap();
    let text = String::from_utf8(human).expect("human output is UTF-8");
    assert!(text.ends_with('\n'), "{text:?}");
    // Stack lines may follow the alert line: each is checked.
    for line in text.lines() {
        assert!(
            !line.chars().any(char::is_control),
            "raw control character in {line:?}"
        );
    }
    let mut json = Vec::new();
    JsonSink::new(&mut json).alert(alert, 1, &HOST, "cache").unwrap();
    let text = String::from_utf8(json).expect("JSON is UTF-8");
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    serde_json::from_str::<serde_json::Value>(&text).expect("JSON parses");
}

fuzz_target!(|data: &[u8]| {
    // Keys rendered in 3.11's object layout and in 3.12's (another str header, tagged ints).
    let keys = |version| {
        let objects = python::layout::objects(version);
        Correlator::new(
            Vec::new(),
            Some(Box::new(move |k| python::key::render(k, &objects))),
        )
    };
    let mut correlators = [Correlator::new(
        vec![Some(MissValue {
            value: -1,
            bytes: 8,
        })],
        None,
    ), keys((3, 11)), keys((3, 12))];
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (record, next) = tail.split_at(len);
        rest = next;
        let Ok(event) = Event::decode(record) else {
            continue;
        };
        for correlator in &mut correlators {
            correlator.on_event(&event).iter().for_each(check);
        }
    }
    for correlator in &mut correlators {
        correlator.finish();
    }
});
