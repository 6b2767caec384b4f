//! Named parameter shapes: what a model holds, known before (or without) allocating it.

/// One parameter: torchtune name, shape, and whether training updates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Totals printed by torchtune after building a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: usize,
    pub trainable: usize,
}

impl ParamCounts {
    pub fn of(params: &[ParamInfo]) -> Self {
        ParamCounts {
            total: params.iter().map(ParamInfo::numel).sum(),
            trainable: params
                .iter()
                .filter(|p| p.trainable)
                .map(ParamInfo::numel)
                .sum(),
        }
    }

    /// torchtune's summary line, e.g. `6742609920 total params, 4194304 trainable params, 0.06% of
    /// all params are trainable.`
    pub fn summary(&self) -> String {
        let pct = 100.0 * self.trainable as f64 / self.total.max(1) as f64;
        format!(
            "{} total params, {} trainable params, {:.2}% of all params are trainable.",
            self.total, self.trainable, pct
        )
    }
}
