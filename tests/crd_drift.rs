//! The committed CRD YAML must be exactly what `scopehold crdgen` prints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let documents = scopehold::crdgen::documents().expect("render CRDs");
    for (file, generated) in documents {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| {
            panic!("crds/{file} missing ({e}); run `cargo run -- crdgen --out-dir crds`")
        });
        assert!(
            committed == generated,
            "crds/{file} is stale: run `cargo run -- crdgen --out-dir crds` and commit the result"
        );
    }
}

#[test]
fn chart_crds_match_when_the_chart_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart = root.join("charts/scopehold/crds");
    if !chart.exists() {
        return;
    }
    for (file, generated) in scopehold::crdgen::documents().expect("render CRDs") {
        let copy = std::fs::read_to_string(chart.join(file)).unwrap_or_default();
        assert!(
            copy == generated,
            "charts/scopehold/crds/{file} differs from crds/{file}"
        );
    }
}
