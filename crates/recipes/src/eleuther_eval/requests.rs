//! The (context, continuation) pairs to score, and their tokenization as lm-eval's.

use std::collections::HashMap;

use tune_data::Llama2Tokenizer;

use super::scorer::Score;
use super::truthfulqa::{context, continuation, Question, Task};
use super::{ChoiceResult, QuestionResult, TaskResult};

/// The distinct (context, continuation) pairs to score, and which ones each task's questions use.
pub(super) struct RequestPlan {
    pub(super) requests: Vec<(String, String)>,
    /// Per task, per question (data-file order): the request index of each answer.
    per_task: Vec<(Task, Vec<Vec<usize>>)>,
}

impl RequestPlan {
    pub(super) fn new(tasks: &[Task], questions: &[Question]) -> Self {
        let mut requests = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut per_task = Vec::new();
        for &task in tasks {
            let mut rows = Vec::with_capacity(questions.len());
            for q in questions {
                let ctx = context(&q.question);
                let ids = task
                    .targets(q)
                    .iter()
                    .map(|(answer, _)| {
                        let key = (ctx.clone(), continuation(answer));
                        *index.entry(key.clone()).or_insert_with(|| {
                            requests.push(key);
                            requests.len() - 1
                        })
                    })
                    .collect();
                rows.push(ids);
            }
            per_task.push((task, rows));
        }
        RequestPlan { requests, per_task }
    }

    pub(super) fn results(
        &self,
        questions: &[Question],
        encoded: &[Encoded],
        scores: &[Score],
    ) -> Vec<TaskResult> {
        let mut out = Vec::new();
        for (task, rows) in &self.per_task {
            let results: Vec<QuestionResult> = rows
                .iter()
                .enumerate()
                .map(|(index, ids)| {
                    question_result(*task, index, &questions[index], ids, encoded, scores)
                })
                .collect();
            let accs: Vec<f64> = results.iter().map(|q| q.acc).collect();
            let (acc, stderr) = mean_and_stderr(&accs);
            out.push(TaskResult {
                task: *task,
                acc,
                stderr,
                questions: results,
                available: questions.len(),
            });
        }
        out
    }
}

/// One question's answers with their scores (`ids`: the request index of each answer).
fn question_result(
    task: Task,
    index: usize,
    question: &Question,
    ids: &[usize],
    encoded: &[Encoded],
    scores: &[Score],
) -> QuestionResult {
    let choices: Vec<ChoiceResult> = task
        .targets(question)
        .iter()
        .zip(ids)
        .map(|((answer, label), &r)| ChoiceResult {
            answer: answer.clone(),
            label: *label,
            ll: scores[r].ll,
            is_greedy: scores[r].is_greedy,
            continuation_ids: encoded[r].continuation.clone(),
        })
        .collect();
    let lls: Vec<f64> = choices.iter().map(|c| c.ll).collect();
    let labels: Vec<u8> = choices.iter().map(|c| c.label).collect();
    QuestionResult {
        index,
        acc: task.score(&lls, &labels),
        choices,
    }
}

/// The mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports.
pub fn mean_and_stderr(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((var / n).sqrt()))
}

/// A request as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

impl Encoded {
    pub(super) fn total(&self) -> usize {
        self.context.len() + self.continuation.len()
    }
}

/// lm-eval's split of a request into tokens: trailing whitespace of the context moves to the
/// continuation, `whole = [BOS] + encode(context + continuation)`, `context = [BOS] +
/// encode(context)` (without BOS when `add_bos` is false), and the continuation is what `whole`
/// has beyond the context's length.
pub fn encode_pair(
    tokenizer: &Llama2Tokenizer,
    context: &str,
    continuation: &str,
    add_bos: bool,
) -> Encoded {
    let trimmed = context.trim_end();
    let (context, continuation) = (
        trimmed,
        format!("{}{continuation}", &context[trimmed.len()..]),
    );
    let whole = tokenizer.encode(&format!("{context}{continuation}"), add_bos, false, false);
    let context_ids = tokenizer.encode(context, add_bos, false, false);
    let split = context_ids.len().min(whole.len());
    Encoded {
        context: context_ids,
        continuation: whole[split..].to_vec(),
    }
}
