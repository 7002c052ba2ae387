//! Inputs found by fuzzing (`fuzz/`, see fuzz/README.md): every model in `testdata/fuzz/` once
//! made the tool panic, or is a small corpus entry that reaches deep paths (folding, spreading
//! dilations, verification). Each goes through the library (`inspect_model`, `fuse_model`, and a
//! second `fuse_model` of a successful output, which must fuse nothing more) and through the
//! real binary (`fuse IN OUT`, `inspect IN`): no panic, and an error is exit 1 with one line
//! naming the file, with nothing left in the output folder and the input unchanged. A new file
//! dropped into `testdata/fuzz/` is covered without touching this test; the table below pins
//! the outcome of the known ones.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use onnx_repvgg::{Options, fuse_model, inspect_model};

/// What fusing a regression input must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refused: exit 1, this text in the message.
    Error(&'static str),
    /// Written, with this many blocks fused.
    Fused(usize),
}

/// Known inputs: file, outcome, and what went wrong before the fix.
const KNOWN: &[(&str, Expect, &str)] = &[
    (
        "branch_rank_mismatch.onnx",
        // A 2-D Conv (weight [6, 6, 2, 1]) and a 1-D Conv summed: no block.
        Expect::Fused(0),
        "affine.rs common_dilations(): index out of bounds (the first branch's rank indexed the \
         second's kernel)",
    ),
    // Corpus entries of `fuse_structured` (well-formed mode) that fold and verify deep blocks.
    (
        "deep_3d_stride2_sub_branches.onnx",
        Expect::Fused(1),
        "3-D depthwise, stride 2: 1x1x3 + 1x1x1 d3 + 1x5x1 − a Conv whose weight comes through \
         Identity; kernels embedded at their pad offsets (float64)",
    ),
    (
        "deep_avgpool_minus_identity_mul_fp16.onnx",
        Expect::Fused(1),
        "1x1 d2 + avgpool 3x3 − identity, then Mul by a per-channel constant (float16)",
    ),
    (
        "deep_depthwise_asymmetric_kernels_f64.onnx",
        Expect::Fused(1),
        "depthwise 1x1 + 5x3 + 1x1 + 1x1 d2 (float64)",
    ),
    (
        "deep_identity_bn_div_mul.onnx",
        Expect::Fused(1),
        "1x1 + 1x1 d2 + identity, then BatchNormalization, Div and Mul",
    ),
    (
        "initializer_dims_overflow.onnx",
        Expect::Error(
            "not a valid ONNX model: tensor 'c1': dims [1099511627776, 2147483647] overflow",
        ),
        // An unused initializer declaring 2^71 elements (no data): the report's parameter count
        // multiplied dims in u64 (lib.rs, `elements`) and overflowed.
        "lib.rs parameter count: attempt to multiply with overflow",
    ),
    (
        "report_group_overflow.onnx",
        Expect::Error(
            "dims [4611686018427387904, 9223372036854775807, 4611686018427387904] overflow",
        ),
        "report.rs describe(): in_channels = dims[1] × group overflowed (group 2^31, a Constant \
         weight declaring huge dims)",
    ),
    (
        "shapes_window_dilation_overflow.onnx",
        // A lone Conv (no block) with dilations i64::MAX: nothing to fuse.
        Expect::Fused(0),
        "shapes.rs window(): dilation × (kernel − 1) overflowed (inspect's FLOPs)",
    ),
    (
        "verify_dilation_overflow.onnx",
        Expect::Error("the dilated kernel is too large to check"),
        "verify.rs check_block() (now expect()): dilation × (kernel − 1) overflowed",
    ),
    (
        "verify_huge_pads_timeout.onnx",
        // A 3-D Conv (weight [8, 8, 4, 3, 2]) → BN with one pad of 43690.
        Expect::Error("the geometry is too large to check"),
        "verify.rs conv(): 37 s on one input (libFuzzer timeout): 6.3M output positions × 24 \
         taps for each of the 8 sampled channels",
    ),
    (
        "verify_input_too_large.onnx",
        Expect::Error("the check's input [1, 2, 4398046511105, 3298534883329] would be too large"),
        "verify.rs check_block() (now expect()): ndarray 'Shape too large' for the check's \
         input (dilation 2^40)",
    ),
    (
        "verify_zero_kernel.onnx",
        // Conv weight [6, 6, 0] → BN: an empty kernel is no block to fold.
        Expect::Fused(0),
        "verify.rs check_block() (now expect()): kernel − 1 underflowed on a zero-sized kernel",
    ),
];

/// Runs `f`, failing the test with `name` and `what` if it panics.
fn guarded<T>(name: &str, what: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{name}: {what} panicked"))
}

fn inputs() -> Vec<PathBuf> {
    let dir = crate::common::testdata().join("fuzz");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/fuzz")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(files.len() >= KNOWN.len(), "testdata/fuzz holds {files:?}");
    files
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn expected(name: &str) -> Option<Expect> {
    KNOWN.iter().find(|(n, ..)| *n == name).map(|&(_, e, _)| e)
}

#[test]
fn every_known_input_is_present() {
    let names: Vec<String> = inputs().iter().map(|p| name(p)).collect();
    for (known, ..) in KNOWN {
        assert!(names.iter().any(|n| n == known), "{known} missing");
    }
}

#[test]
fn the_library_never_panics() {
    for path in inputs() {
        let name = name(&path);
        let bytes = std::fs::read(&path).unwrap();
        for options in [
            Options::default(),
            Options {
                allow_training_bn: true,
                ..Options::default()
            },
            Options {
                verify: false,
                ..Options::default()
            },
        ] {
            let _ = guarded(&name, "inspect_model", || inspect_model(&bytes, options));
            let fused = guarded(&name, "fuse_model", || fuse_model(&bytes, options));
            if let Ok((deploy, _)) = &fused {
                let (_, again) = fuse_model(deploy, options)
                    .unwrap_or_else(|e| panic!("{name}: the fused model does not fuse: {e}"));
                assert!(again.fused.is_empty(), "{name}: not idempotent");
            }
            if options.verify && !options.allow_training_bn {
                match (expected(&name), &fused) {
                    (Some(Expect::Error(needle)), Err(e)) => {
                        assert!(e.to_string().contains(needle), "{name}: {e}")
                    }
                    (Some(Expect::Fused(n)), Ok((_, report))) => {
                        assert_eq!(report.fused.len(), n, "{name}")
                    }
                    (None, _) => {}
                    (Some(want), got) => panic!(
                        "{name}: expected {want:?}, got {:?}",
                        got.as_ref().map(|(_, r)| r.fused.len())
                    ),
                }
            }
        }
    }
}

#[test]
fn the_binary_exits_cleanly() {
    for path in inputs() {
        let name = name(&path);
        let bytes = std::fs::read(&path).unwrap();
        let models = tempfile::tempdir().unwrap();
        let run = crate::common::fuse_fresh(models.path(), &name, &bytes);
        let (input, err) = (&run.input, &run.stderr);
        match run.out.status.code() {
            Some(0) => {
                assert!(run.output.is_file(), "{name}: exit 0 without an output");
                assert!(
                    !matches!(expected(&name), Some(Expect::Error(_))),
                    "{name}: expected an error, exit 0"
                );
            }
            Some(1) => {
                run.assert_clean_failure(&name);
                match expected(&name) {
                    Some(Expect::Error(needle)) => {
                        assert!(err.contains(needle), "{name}: '{needle}' not in {err}")
                    }
                    Some(Expect::Fused(_)) => panic!("{name}: expected a fusion, got {err}"),
                    None => {}
                }
            }
            code => panic!("{name}: fuse exited with {code:?} (a panic is 101): {err}"),
        }
        assert_eq!(
            std::fs::read(input).unwrap(),
            bytes,
            "{name}: input changed"
        );

        let o = crate::common::bin(&["inspect".as_ref(), input.as_os_str()]);
        let err = String::from_utf8_lossy(&o.stderr);
        match o.status.code() {
            Some(0) => {}
            Some(1) => assert_eq!(err.lines().count(), 1, "{name}: inspect: {err}"),
            code => panic!("{name}: inspect exited with {code:?} (a panic is 101): {err}"),
        }
    }
}
