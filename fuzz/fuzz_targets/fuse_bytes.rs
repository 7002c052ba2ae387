//! Arbitrary bytes through the whole pipeline: load, index, match, fold, verify, write.
//!
//! Invariants: nothing panics (errors are fine), and a successful fusion is idempotent — fusing
//! the output again succeeds and fuses nothing more.

#![no_main]

use libfuzzer_sys::fuzz_target;
use onnx_repvgg::{Options, fuse_model, inspect_model};

fuzz_target!(|data: &[u8]| {
    let options = Options::default();
    let _ = inspect_model(data, options);
    let Ok((deploy, report)) = fuse_model(data, options) else {
        return;
    };
    check_idempotent(&deploy, options);
    // Blocks refused for training-mode BatchNormalization are folded with --allow-training.
    if !report.skipped.is_empty() {
        let training = Options {
            allow_training_bn: true,
            ..options
        };
        if let Ok((deploy, _)) = fuse_model(data, training) {
            check_idempotent(&deploy, training);
        }
    }
});

fn check_idempotent(deploy: &[u8], options: Options) {
    match fuse_model(deploy, options) {
        Ok((_, again)) => assert!(
            again.fused.is_empty(),
            "fusing the fused model again fused {} more block(s): {:?}",
            again.fused.len(),
            again.fused.iter().map(|b| &b.name).collect::<Vec<_>>()
        ),
        Err(e) => panic!("the fused model does not fuse again: {e}"),
    }
}
