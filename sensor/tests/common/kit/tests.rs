//! The kit's own tests, compiled once, in xtask (`cargo test -p xtask`): the test binaries
//! that include the kit do not run them twenty times.

mod promtext {
    use crate::kit::promtext::*;

    #[test]
    fn labels_are_read_whole_and_matched_exactly() {
        let text = "# HELP x a\n# TYPE x counter\nx{a=\"1,b=\\\"2\\\"}\",b=\"two words\"} 3\nx{a=\"1\"} 4 1700000000000\ny 5\nz{} +Inf\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].label("a"), Some("1,b=\"2\"}"));
        assert_eq!(s[0].label("b"), Some("two words"));
        assert_eq!(value(text, "x", &[("a", "1")]), Some(4.0));
        assert_eq!(value(text, "x", &[]), None, "exact label set");
        assert_eq!(sum(text, "x", &[]), 7.0);
        assert_eq!(sum(text, "x", &[("b", "two words")]), 3.0);
        assert_eq!(value(text, "y", &[]), Some(5.0));
        assert_eq!(value(text, "z", &[]), Some(f64::INFINITY));
        assert_eq!(series_count(text), 4);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x 2 3 4",
            "x{a=\"\\q\"} 1",
            "x two",
            "9x 1",
            "x{a=\"1\"b=\"2\"} 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sums_take_only_the_named_family() {
        let text = "# HELP x\nsensor_oom_kills_total{cgroup=\"/a\",reason=\"limit\"} 2\n\
                    sensor_oom_kills_total{cgroup=\"/a\",reason=\"other\"} 1\n\
                    sensor_oom_kills_total{cgroup=\"/b\",reason=\"limit\"} 5\n\
                    sensor_oom_kills_total_x{cgroup=\"/a\"} 7\nplain 3\n";
        assert_eq!(sum(text, "sensor_oom_kills_total", &[("cgroup", "/a")]), 3.0);
        assert_eq!(sum(text, "sensor_oom_kills_total", &[]), 8.0);
        assert_eq!(sum(text, "plain", &[]), 3.0);
    }
}
