//! INT8 readiness of a fused kernel: what people check by hand when a re-parameterized model
//! loses accuracy under quantization. The fold adds the identity (a 1 at the centre tap) and the
//! BN-scaled branches into one kernel, which often widens its range far beyond most weights;
//! per-tensor INT8 then spends its 255 levels on a few outliers.
//!
//! For one kernel: its range, the spread of per-output-channel ranges, the share of weights
//! beyond k·σ, and the signal-to-quantization-noise ratio (SQNR) of symmetric INT8 weights
//! quantized per tensor and per output channel. A value type: no protobuf here.

/// Weights further than this many standard deviations from the mean count as outliers.
pub const OUTLIER_SIGMAS: f64 = 3.0;

/// Below this per-tensor SQNR (dB), a kernel is flagged as likely to hurt per-tensor INT8.
pub const RISK_SQNR_DB: f64 = 30.0;

/// Quantization statistics of one kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Int8Stats {
    pub min: f64,
    pub max: f64,
    /// Largest per-output-channel absolute maximum over the smallest non-zero one.
    pub channel_spread: f64,
    /// Share of weights beyond [`OUTLIER_SIGMAS`] standard deviations from the mean.
    pub outliers: f64,
    /// SQNR in dB of symmetric INT8 with one scale for the whole tensor.
    pub sqnr_per_tensor_db: f64,
    /// SQNR in dB of symmetric INT8 with one scale per output channel.
    pub sqnr_per_channel_db: f64,
}

impl Int8Stats {
    /// Computes the statistics of `weights`, laid out output channel by output channel.
    pub fn of(weights: &[f64], out_channels: usize) -> Int8Stats {
        let n = weights.len().max(1) as f64;
        let (min, max) = weights
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &w| {
                (lo.min(w), hi.max(w))
            });
        let mean = weights.iter().sum::<f64>() / n;
        let sigma = (weights.iter().map(|w| (w - mean).powi(2)).sum::<f64>() / n).sqrt();
        let outliers = weights
            .iter()
            .filter(|w| (*w - mean).abs() > OUTLIER_SIGMAS * sigma)
            .count() as f64
            / n;
        let row = weights.len() / out_channels.max(1);
        let rows: Vec<&[f64]> = weights.chunks(row.max(1)).collect();
        let absmax = |r: &[f64]| r.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        let maxima: Vec<f64> = rows.iter().map(|r| absmax(r)).collect();
        let largest = maxima.iter().copied().fold(0.0, f64::max);
        let smallest = maxima
            .iter()
            .copied()
            .filter(|&m| m > 0.0)
            .fold(f64::INFINITY, f64::min);
        let channel_spread = if smallest.is_finite() {
            largest / smallest
        } else {
            1.0
        };
        let signal: f64 = weights.iter().map(|w| w * w).sum();
        let per_tensor = quantization_noise(weights, absmax(weights));
        let per_channel: f64 = rows.iter().map(|r| quantization_noise(r, absmax(r))).sum();
        Int8Stats {
            min,
            max,
            channel_spread,
            outliers,
            sqnr_per_tensor_db: sqnr_db(signal, per_tensor),
            sqnr_per_channel_db: sqnr_db(signal, per_channel),
        }
    }

    /// Whether per-tensor INT8 is likely to hurt (SQNR below [`RISK_SQNR_DB`]).
    pub fn is_risky(&self) -> bool {
        self.sqnr_per_tensor_db < RISK_SQNR_DB
    }

    /// Whether even per-output-channel INT8 is likely to hurt (its SQNR below
    /// [`RISK_SQNR_DB`] too).
    pub fn is_risky_per_channel(&self) -> bool {
        self.sqnr_per_channel_db < RISK_SQNR_DB
    }

    /// What to do about this kernel under INT8: never "use per-channel" when per-channel is
    /// under the threshold too.
    pub fn advice(&self) -> Advice {
        match (self.is_risky(), self.is_risky_per_channel()) {
            (false, _) => Advice::Ok,
            (true, false) => Advice::PerChannel,
            (true, true) => Advice::KeepFloat,
        }
    }

    /// The JSON object of `inspect --int8 --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "min": self.min,
            "max": self.max,
            "channel_spread": finite(self.channel_spread),
            "outliers": self.outliers,
            "sqnr_per_tensor_db": finite(self.sqnr_per_tensor_db),
            "sqnr_per_channel_db": finite(self.sqnr_per_channel_db),
            "risky": self.is_risky(),
            "risky_per_channel": self.is_risky_per_channel(),
            "advice": self.advice().key(),
        })
    }
}

/// What a kernel's statistics advise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// Per-tensor INT8 is fine.
    Ok,
    /// Per-tensor INT8 is risky, per-channel is not.
    PerChannel,
    /// Both are risky: keep the layer in floating point (or retrain with quantization in mind).
    KeepFloat,
}

impl Advice {
    /// The JSON value: `ok`, `per-channel`, `keep-float`.
    pub fn key(self) -> &'static str {
        match self {
            Advice::Ok => "ok",
            Advice::PerChannel => "per-channel",
            Advice::KeepFloat => "keep-float",
        }
    }

    /// What the `inspect --int8` table says.
    pub fn text(self) -> &'static str {
        match self {
            Advice::Ok => "ok",
            Advice::PerChannel => "per-tensor risky: use per-channel",
            Advice::KeepFloat => "risky even per-channel: keep in float",
        }
    }
}

/// JSON has no infinity: `null` stands for it.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Sum of squared errors of symmetric INT8 (levels −127..127) with scale `absmax / 127`.
fn quantization_noise(weights: &[f64], absmax: f64) -> f64 {
    if absmax == 0.0 {
        return 0.0;
    }
    let scale = absmax / 127.0;
    weights
        .iter()
        .map(|w| {
            let q = (w / scale).round().clamp(-127.0, 127.0) * scale;
            (w - q).powi(2)
        })
        .sum()
}

fn sqnr_db(signal: f64, noise: f64) -> f64 {
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (signal / noise).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights spread evenly in [-1, 1), a fixed pseudo-random order.
    fn even(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 7919) % n) as f64 / n as f64 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn uniform_weights_quantize_well_and_have_no_outliers() {
        let w = even(4096);
        let s = Int8Stats::of(&w, 16);
        assert_eq!(s.outliers, 0.0);
        // Uniform signal over the full INT8 range: about 6.02·8 − 1.25 ≈ 47 dB.
        assert!((40.0..50.0).contains(&s.sqnr_per_tensor_db), "{s:?}");
        assert!(!s.is_risky());
        assert!(s.channel_spread < 1.1);
    }

    #[test]
    fn one_large_weight_ruins_per_tensor_but_not_per_channel() {
        // What folding an identity into small BN-scaled kernels does: 1.0 at one tap.
        let mut w: Vec<f64> = even(4096).iter().map(|v| v * 0.01).collect();
        w[4] = 1.0;
        let s = Int8Stats::of(&w, 16);
        assert!(s.is_risky(), "{s:?}");
        assert!(s.sqnr_per_channel_db > s.sqnr_per_tensor_db + 10.0, "{s:?}");
        assert!(s.channel_spread > 50.0, "{s:?}");
        assert!(s.outliers > 0.0 && s.outliers < 0.01, "{s:?}");
        assert_eq!(s.max, 1.0);
    }

    #[test]
    fn advice_never_sends_to_per_channel_when_per_channel_is_risky_too() {
        // One channel of tiny weights with one large one: per-channel cannot help that row.
        let mut w: Vec<f64> = even(4096).iter().map(|v| v * 0.001).collect();
        w[4] = 1.0;
        let s = Int8Stats::of(&w, 1);
        assert!(s.is_risky() && s.is_risky_per_channel(), "{s:?}");
        assert_eq!(s.advice(), Advice::KeepFloat);
        assert!(!s.advice().text().contains("use per-channel"));
        assert_eq!(s.to_json()["advice"], "keep-float");
        // Sixteen channels: the large weight spoils only its own row's scale.
        let mut w: Vec<f64> = even(4096).iter().map(|v| v * 0.01).collect();
        w[4] = 1.0;
        let s = Int8Stats::of(&w, 16);
        assert_eq!(s.advice(), Advice::PerChannel, "{s:?}");
        assert_eq!(Int8Stats::of(&even(4096), 16).advice(), Advice::Ok);
    }

    #[test]
    fn zero_weights_do_not_divide_by_zero() {
        let s = Int8Stats::of(&[0.0; 18], 2);
        assert_eq!(s.channel_spread, 1.0);
        assert!(s.sqnr_per_tensor_db.is_infinite());
        assert!(!s.is_risky());
        assert_eq!(s.to_json()["sqnr_per_tensor_db"], serde_json::Value::Null);
    }
}
