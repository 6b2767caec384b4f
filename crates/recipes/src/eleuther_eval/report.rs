//! The results table and `eval_results.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use super::{EvalReport, QuestionResult};

impl EvalReport {
    /// The results as a Markdown table (lm-eval's layout).
    pub fn table(&self) -> String {
        let mut out = String::from("|     Tasks      |Metric|Value |   |Stderr|  n  |\n|----------------|------|-----:|---|-----:|----:|\n");
        for t in &self.tasks {
            let stderr = t.stderr.map_or("N/A".to_string(), |s| format!("{s:.4}"));
            let _ = writeln!(
                out,
                "|{:<16}|acc   |{:.4}|±  |{stderr}|{:>5}|",
                t.task.name(),
                t.acc,
                t.questions.len()
            );
        }
        let _ = write!(
            out,
            "\n{} answers scored ({} tokens) in {:.1}s, {:.1} answers/s",
            self.requests,
            self.tokens_scored,
            self.seconds,
            self.requests as f64 / self.seconds.max(1e-9)
        );
        out
    }

    /// Writes `dir/eval_results.json`: lm-eval's `results` and `n-samples` keys, the run's
    /// settings, timing and (with `samples`) every answer's log-likelihood.
    pub fn write_json(
        &self,
        dir: &Path,
        config: serde_json::Value,
        samples: bool,
    ) -> Result<PathBuf> {
        let mut results = serde_json::Map::new();
        let mut n_samples = serde_json::Map::new();
        let mut logged = serde_json::Map::new();
        for t in &self.tasks {
            let name = t.task.name();
            results.insert(
                name.into(),
                json!({"alias": name, "acc,none": t.acc, "acc_stderr,none": t.stderr}),
            );
            n_samples.insert(
                name.into(),
                json!({"original": t.available, "effective": t.questions.len()}),
            );
            if samples {
                logged.insert(
                    name.into(),
                    json!(t.questions.iter().map(question_json).collect::<Vec<_>>()),
                );
            }
        }
        let mut doc = json!({
            "results": results,
            "n-samples": n_samples,
            "config": config,
            "timing": {
                "seconds": self.seconds,
                "requests": self.requests,
                "tokens_scored": self.tokens_scored,
                "requests_per_second": self.requests as f64 / self.seconds.max(1e-9),
            },
        });
        if samples {
            doc["samples"] = serde_json::Value::Object(logged);
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output_dir {}", dir.display()))?;
        let path = dir.join("eval_results.json");
        crate::atomic::write(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        Ok(path)
    }
}

fn question_json(q: &QuestionResult) -> serde_json::Value {
    json!({
        "index": q.index,
        "acc": q.acc,
        "choices": q.choices.iter().map(|c| json!({"answer": c.answer, "label": c.label, "ll": c.ll, "is_greedy": c.is_greedy})).collect::<Vec<_>>(),
    })
}
