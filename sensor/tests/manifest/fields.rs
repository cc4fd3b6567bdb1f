//! Every field of the template maps onto both runtimes or is named as not applicable.

use super::*;

#[test]
fn every_template_field_maps_onto_podman_and_ctr() {
    // Without privileges: the base template and every overlay parse into runtime options
    // (an unmapped field fails here first), and the options carry each capability, mount and
    // env entry of the template.
    let mut trees = vec![None];
    let overlays = std::fs::read_dir(root().join("deploy/kubernetes/overlays")).unwrap();
    let mut names: Vec<String> = overlays
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    trees.extend(names.iter().map(|n| Some(n.as_str())));
    for tree in trees {
        let run = PodRun::from_daemonset(&daemonset(tree), &format!("{}-parse", tag()));
        let args = run.podman_args().join(" ");
        for c in &run.cap_add {
            assert!(args.contains(&format!("--cap-add {c}")), "{tree:?}: {args}");
        }
        for m in &run.mounts {
            assert!(
                args.contains(&format!(":{}:", m.dst)),
                "{tree:?}: {} not mounted: {args}",
                m.dst
            );
        }
        for (k, _) in &run.env {
            assert!(args.contains(&format!("-e {k}=")), "{tree:?}: {args}");
        }
        assert!(run.args.iter().any(|a| a == "--config"), "{tree:?}: {:?}", run.args);
        // The vantage point's node name and zone come from the downward API through $(VAR).
        assert!(
            run.args.contains(&format!("--vantage.node={}", hostname()))
                && run.args.iter().any(|a| a == "--vantage.location=")
                && !run.args.iter().any(|a| a.contains("$(")),
            "{tree:?}: {:?}",
            run.args
        );
        assert_eq!(run.privileged, tree == Some("privileged"), "{tree:?}");
        if tree == Some("seccomp") {
            assert!(matches!(run.seccomp, Seccomp::Localhost(_)), "{:?}", run.seccomp);
        }
    }
}
