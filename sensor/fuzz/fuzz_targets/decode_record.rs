//! Ring records: the header check against the kinds the real probes register, then each
//! slice's conversion of an accepted record into its event.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sensor::{
    config::Probes,
    decode::{read, DecodeError, KindTable},
    oom::OomKill,
    probe::RecordKind,
    tcp::TcpFailure,
};
use sensor_common::{
    oom::OomKillRecord,
    record::{kind, RecordHeader},
    tcp::TcpFailureRecord,
};

fn kinds() -> &'static (KindTable, Vec<RecordKind>) {
    static K: OnceLock<(KindTable, Vec<RecordKind>)> = OnceLock::new();
    K.get_or_init(|| {
        let mut t = KindTable::default();
        let mut all = Vec::new();
        for (i, p) in sensor::probes::all(&Probes::default()).iter().enumerate() {
            t.add(p.spec().records, i);
            all.extend_from_slice(p.spec().records);
        }
        (t, all)
    })
}

fuzz_target!(|data: &[u8]| {
    let (table, all) = kinds();
    let result = table.check(data);
    let Some(h) = read::<RecordHeader>(data) else {
        assert_eq!(
            result,
            Err(DecodeError::TruncatedHeader {
                got: data.len(),
                need: 16
            })
        );
        return;
    };
    let Some(spec) = all.iter().find(|k| k.kind == h.kind) else {
        assert_eq!(result, Err(DecodeError::UnknownKind(h.kind)));
        return;
    };
    match result {
        Ok((k, owner)) => {
            assert_eq!(k, h.kind);
            assert_eq!(table.owner(k), Some(owner));
            assert_eq!((h.len, h.version), (spec.len, spec.version));
            assert!(data.len() >= usize::from(h.len));
        }
        Err(e) => {
            assert_eq!(e.kind(), Some(h.kind));
            return;
        }
    }
    match h.kind {
        kind::OOM_KILL => {
            let r: OomKillRecord = read(data).expect("an accepted record is long enough");
            let k = OomKill::from_record(&r, None, None);
            // (Kernfs names never hold '/', so a random one may add segments: not checked.)
            if let Some(c) = &k.cgroup {
                assert!(c.starts_with('/') && !c.contains('\0'), "{c:?}");
            }
            for comm in k.victim_comm.iter().chain([&k.trigger_comm]) {
                assert!(!comm.contains('\0') && comm.len() <= 16 * 3, "{comm:?}");
            }
            let v = serde_json::to_value(&k).expect("an OOM kill serializes");
            assert!(v.is_object());
        }
        kind::TCP_CONNECT_FAILURE => {
            let r: TcpFailureRecord = read(data).expect("an accepted record is long enough");
            let names = ["dns".to_string(), "postgres".to_string()];
            let wl: sensor::cgroup::WorkloadLabels = Default::default();
            let f = TcpFailure::from_record(&r, &names, None, &wl, Default::default());
            assert!(f.address.parse::<std::net::IpAddr>().is_ok(), "{}", f.address);
            assert!(!f.comm.contains('\0'));
            let v = serde_json::to_value(&f).expect("a TCP failure serializes");
            assert!(v.is_object());
        }
        other => panic!("kind {other} accepted but no slice decodes it"),
    }
});
