//! Chat messages and prompt templates, as torchtune's `Message`, `PromptTemplate` and
//! `Llama2ChatTemplate`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use serde_yaml::Value;

/// Who says a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
    Ipython,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "ipython" => Role::Ipython,
            other => bail!(
                "unknown message role {other:?} (expected system, user, assistant or ipython)"
            ),
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Ipython => "ipython",
        }
    }
}

/// One message. `content` holds its text items in order (torchtune's `[{"type": "text", ...}]`);
/// templates add items around them, and the tokenizer encodes each item separately.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<String>,
    /// Excluded from the loss (its labels become -100).
    pub masked: bool,
    pub ipython: bool,
    /// End of turn.
    pub eot: bool,
}

impl Message {
    /// A message with one text item, `ipython: false`, `eot: true`.
    pub fn new(role: Role, text: impl Into<String>, masked: bool) -> Self {
        Message {
            role,
            content: vec![text.into()],
            masked,
            ipython: false,
            eot: true,
        }
    }

    /// All text items joined.
    pub fn text(&self) -> String {
        self.content.concat()
    }
}

/// torchtune's `validate_messages`: at least two messages, a system message only first, user
/// and assistant alternating with the user first.
pub fn validate_messages(messages: &[Message]) -> Result<()> {
    if messages.len() < 2 {
        bail!(
            "messages must be at least length 2, but got {} messages",
            messages.len()
        );
    }
    let mut last = Role::Assistant;
    for (i, m) in messages.iter().enumerate() {
        if m.role == Role::Assistant && last != Role::User {
            bail!("assistant message before expected user message at index {i} in messages");
        }
        if m.role == Role::User && last == Role::User {
            bail!(
                "two consecutive user messages at index {i} and {} in messages",
                i - 1
            );
        }
        if m.role == Role::System && i > 0 {
            bail!("system message at index {i} in messages, but system messages must come first");
        }
        last = m.role;
    }
    Ok(())
}

/// The torchtune dotted path of the Llama-2 chat template (the default of `llama2_tokenizer`).
pub const LLAMA2_CHAT_TEMPLATE: &str = "torchtune.models.llama2.Llama2ChatTemplate";

/// A prompt template applied by the tokenizer before encoding.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptTemplate {
    /// `Llama2ChatTemplate`: the user turn becomes `"[INST] " + content + " [/INST] "`; a system
    /// message is folded into the user messages after it (every one of them, as torchtune does)
    /// as `"<<SYS>>\n" + system + "\n<</SYS>>\n\n"` right after `"[INST] "`.
    Llama2Chat,
    /// torchtune's generic `PromptTemplate(template={role: (prepend, append)})`, and the named
    /// templates built from it (`QuestionAnswerTemplate`, `SummarizeTemplate`,
    /// `GrammarErrorCorrectionTemplate`).
    Custom(BTreeMap<Role, (String, String)>),
    /// `ChatMLTemplate`: `<|im_start|>{role}\n` + content + `<|im_end|>\n` for system, user and
    /// assistant turns; a final empty assistant turn gets only its opening tag (generation
    /// continues from it).
    ChatMl,
}

/// torchtune's templates that are one `PromptTemplate` of user tags, by class name.
const USER_TAG_TEMPLATES: &[(&str, &str, &str)] = &[
    ("QuestionAnswerTemplate", "Question: ", "\n\nAnswer: "),
    (
        "SummarizeTemplate",
        "Summarize this dialogue:\n",
        "\n---\nSummary:\n",
    ),
    (
        "GrammarErrorCorrectionTemplate",
        "Correct this to standard English: ",
        "\n---\nCorrected: ",
    ),
];

/// The ChatML tags of `role` (none for tool output, as in torchtune).
fn chatml_tags(role: Role) -> (&'static str, &'static str) {
    match role {
        Role::System => ("<|im_start|>system\n", "<|im_end|>\n"),
        Role::User => ("<|im_start|>user\n", "<|im_end|>\n"),
        Role::Assistant => ("<|im_start|>assistant\n", "<|im_end|>\n"),
        Role::Ipython => ("", ""),
    }
}

impl PromptTemplate {
    /// From a config value: a dotted path (`torchtune.models.llama2.Llama2ChatTemplate`, or just
    /// `Llama2ChatTemplate`), or a mapping `{role: [prepend, append]}`. Null means no template.
    pub fn from_config(value: &Value) -> Result<Option<Self>> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) if s == LLAMA2_CHAT_TEMPLATE || s == "Llama2ChatTemplate" => {
                Ok(Some(PromptTemplate::Llama2Chat))
            }
            Value::String(s) => {
                let class = s.strip_prefix("torchtune.data.").unwrap_or(s);
                if class == "ChatMLTemplate" {
                    return Ok(Some(PromptTemplate::ChatMl));
                }
                match USER_TAG_TEMPLATES.iter().find(|(name, _, _)| *name == class) {
                    Some((_, pre, post)) => Ok(Some(PromptTemplate::Custom(BTreeMap::from([(
                        Role::User,
                        (pre.to_string(), post.to_string()),
                    )])))),
                    None => bail!(
                        "prompt_template {s:?} is not supported: use {LLAMA2_CHAT_TEMPLATE}, \
                         torchtune.data.{{ChatMLTemplate, QuestionAnswerTemplate, SummarizeTemplate, \
                         GrammarErrorCorrectionTemplate}}, null (no template), or a mapping of role \
                         to [prepend, append] strings"
                    ),
                }
            }
            Value::Mapping(map) => {
                let mut out = BTreeMap::new();
                for (k, v) in map {
                    let role = Role::parse(
                        k.as_str()
                            .ok_or_else(|| anyhow!("prompt_template keys must be role names"))?,
                    )?;
                    let pair: Vec<String> = serde_yaml::from_value(v.clone()).map_err(|_| {
                        anyhow!(
                            "prompt_template.{}: expected [prepend, append] strings",
                            role.as_str()
                        )
                    })?;
                    let [pre, post]: [String; 2] = pair.try_into().map_err(|_| {
                        anyhow!(
                            "prompt_template.{}: expected exactly two strings",
                            role.as_str()
                        )
                    })?;
                    out.insert(role, (pre, post));
                }
                Ok(Some(PromptTemplate::Custom(out)))
            }
            other => bail!(
                "prompt_template: expected a string, a mapping or null, found {}",
                tune_core::config::kind_of(other)
            ),
        }
    }

    /// Applies the template, returning the templated messages.
    pub fn apply(&self, messages: &[Message]) -> Vec<Message> {
        match self {
            PromptTemplate::Llama2Chat => llama2_chat(messages),
            PromptTemplate::Custom(map) => messages
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    if let Some((pre, post)) = map.get(&m.role) {
                        if !pre.is_empty() {
                            m.content.insert(0, pre.clone());
                        }
                        if !post.is_empty() {
                            m.content.push(post.clone());
                        }
                    }
                    m
                })
                .collect(),
            PromptTemplate::ChatMl => messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut m = m.clone();
                    let (pre, post) = chatml_tags(m.role);
                    let open_reply = m.role == Role::Assistant
                        && i + 1 == messages.len()
                        && m.content.iter().all(String::is_empty);
                    if !pre.is_empty() {
                        m.content.insert(0, pre.to_string());
                    }
                    if !post.is_empty() && !open_reply {
                        m.content.push(post.to_string());
                    }
                    m
                })
                .collect(),
        }
    }
}

fn llama2_chat(messages: &[Message]) -> Vec<Message> {
    let mut system: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let content = match m.role {
            Role::System => {
                system = std::iter::once("<<SYS>>\n".to_string())
                    .chain(m.content.iter().cloned())
                    .chain(std::iter::once("\n<</SYS>>\n\n".to_string()))
                    .collect();
                continue;
            }
            Role::User => std::iter::once("[INST] ".to_string())
                .chain(system.iter().cloned())
                .chain(m.content.iter().cloned())
                .chain(std::iter::once(" [/INST] ".to_string()))
                .collect(),
            Role::Assistant | Role::Ipython => m.content.clone(),
        };
        out.push(Message {
            content,
            ..m.clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_chat_wraps_user_turns_and_folds_the_system_prompt() {
        let msgs = vec![
            Message::new(Role::System, "Be brief.", true),
            Message::new(Role::User, "Hi", true),
            Message::new(Role::Assistant, "Hello", false),
            Message::new(Role::User, "Bye", true),
        ];
        let out = PromptTemplate::Llama2Chat.apply(&msgs);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[0].content,
            [
                "[INST] ",
                "<<SYS>>\n",
                "Be brief.",
                "\n<</SYS>>\n\n",
                "Hi",
                " [/INST] "
            ]
        );
        assert_eq!(out[1].content, ["Hello"]);
        // torchtune keeps the system prompt for every later user turn too.
        assert_eq!(
            out[2].content,
            [
                "[INST] ",
                "<<SYS>>\n",
                "Be brief.",
                "\n<</SYS>>\n\n",
                "Bye",
                " [/INST] "
            ]
        );
        assert!(out[0].masked && !out[1].masked);
    }

    #[test]
    fn templates_from_config() {
        assert_eq!(PromptTemplate::from_config(&Value::Null).unwrap(), None);
        let v: Value = serde_yaml::from_str(LLAMA2_CHAT_TEMPLATE).unwrap();
        assert_eq!(
            PromptTemplate::from_config(&v).unwrap(),
            Some(PromptTemplate::Llama2Chat)
        );
        let v: Value =
            serde_yaml::from_str("{user: ['Q: ', \"\\n\"], assistant: ['A: ', '']}").unwrap();
        let t = PromptTemplate::from_config(&v).unwrap().unwrap();
        let out = t.apply(&[
            Message::new(Role::User, "x", false),
            Message::new(Role::Assistant, "y", false),
        ]);
        assert_eq!(out[0].content, ["Q: ", "x", "\n"]);
        assert_eq!(out[1].content, ["A: ", "y"]);
        let v: Value = serde_yaml::from_str("torchtune.data.AlpacaInstructTemplate").unwrap();
        assert!(
            format!("{:#}", PromptTemplate::from_config(&v).unwrap_err()).contains("not supported")
        );
    }

    #[test]
    fn validation_matches_torchtune() {
        let u = Message::new(Role::User, "u", false);
        let a = Message::new(Role::Assistant, "a", false);
        let s = Message::new(Role::System, "s", false);
        assert!(validate_messages(&[u.clone(), a.clone()]).is_ok());
        assert!(validate_messages(&[s.clone(), u.clone(), a.clone()]).is_ok());
        assert!(validate_messages(std::slice::from_ref(&u)).is_err());
        assert!(validate_messages(&[a.clone(), u.clone()]).is_err());
        assert!(validate_messages(&[u.clone(), u.clone()]).is_err());
        assert!(validate_messages(&[u, a, s]).is_err());
    }
}
