//! The `configs` of a Hugging Face dataset card: the YAML block atop a dataset's `README.md` that
//! names its subsets (`load_dataset(path, name)`, torchtune's `name=`/`subset=`) and says which
//! files each one reads, for each split.
//!
//! ```yaml
//! ---
//! configs:
//! - config_name: wikitext-103-v1
//!   data_files:
//!   - split: train
//!     path: wikitext-103-v1/train-*
//! ---
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde_yaml::Value;

use crate::json_source::DataFiles;

/// One entry of a dataset card's `configs`.
#[derive(Debug, Clone, PartialEq)]
pub struct CardConfig {
    pub name: String,
    /// Its `data_files`, relative to the dataset root joined with `data_dir`.
    pub data_files: Option<DataFiles>,
    /// Its `data_dir`: the folder its files are in (and relative to).
    pub data_dir: Option<String>,
    /// `default: true`: read when no config is named.
    pub default: bool,
}

impl CardConfig {
    /// Its data files relative to the dataset root (its `data_dir` prefixed), always by split:
    /// a plain list is the `train` split of this config, not files the user named.
    pub fn data_files_from_root(&self) -> Option<DataFiles> {
        let files = match self.data_files.clone()? {
            DataFiles::Train(files) => DataFiles::Splits(BTreeMap::from([("train".into(), files)])),
            splits => splits,
        };
        Some(match &self.data_dir {
            Some(dir) => files.relative_to(std::path::Path::new(dir.trim_end_matches('/'))),
            None => files,
        })
    }
}

/// The config of the card `readme` that `load_dataset(dataset, name)` reads (see
/// [`choose_config`]). When `files_chosen` (a `data_dir` or `data_files` says which files to
/// read) none is, though a `name` must still be one of the card's configs. A card whose YAML
/// cannot be read counts as having no configs, unless a config is asked for by name.
pub fn config_to_read(
    readme: &str,
    name: Option<&str>,
    dataset: &str,
    files_chosen: bool,
) -> Result<Option<CardConfig>> {
    let configs = match (card_configs(readme), name) {
        (Ok(configs), _) => configs,
        (Err(e), Some(_)) => return Err(e),
        (Err(e), None) => {
            tracing::warn!("{dataset}: reading README.md as having no configs: {e:#}");
            Vec::new()
        }
    };
    if files_chosen {
        if name.is_some() && !configs.is_empty() {
            choose_config(&configs, name, dataset)?;
        }
        return Ok(None);
    }
    Ok(choose_config(&configs, name, dataset)?.cloned())
}

/// The configs a `README.md` declares; none when it has no YAML block or no `configs` key.
pub fn card_configs(readme: &str) -> Result<Vec<CardConfig>> {
    let Some(yaml) = front_matter(readme) else {
        return Ok(Vec::new());
    };
    let card: Value = serde_yaml::from_str(yaml).context("the YAML block of README.md")?;
    let Some(configs) = card.get("configs").filter(|c| !c.is_null()) else {
        return Ok(Vec::new());
    };
    let configs = configs
        .as_sequence()
        .ok_or_else(|| anyhow!("README.md: `configs` must be a list"))?;
    configs
        .iter()
        .map(|config| {
            let name = match config.get("config_name") {
                Some(Value::String(name)) => name.clone(),
                // `config_name: 2022` is the name "2022".
                Some(Value::Number(number)) => number.to_string(),
                _ => bail!("README.md: a config has no `config_name`"),
            };
            let data_files = config
                .get("data_files")
                .map(config_data_files)
                .transpose()
                .with_context(|| format!("README.md: data_files of config {name:?}"))?;
            let data_dir = config
                .get("data_dir")
                .and_then(Value::as_str)
                .map(str::to_string);
            let default = config.get("default").and_then(Value::as_bool) == Some(true);
            Ok(CardConfig {
                name,
                data_files,
                data_dir,
                default,
            })
        })
        .collect()
}

/// The text between a leading `---` line and the next `---` line.
fn front_matter(readme: &str) -> Option<&str> {
    let readme = readme.strip_prefix('\u{feff}').unwrap_or(readme);
    let rest = readme
        .strip_prefix("---\n")
        .or_else(|| readme.strip_prefix("---\r\n"))?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return Some(&rest[..offset]);
        }
        offset += line.len();
    }
    None
}

/// A config's `data_files`: a path, a list of paths, a list of `{split, path}` entries (each
/// path a string or a list), or a mapping of split names to paths.
fn config_data_files(value: &Value) -> Result<DataFiles> {
    let Some(entries) = value.as_sequence() else {
        return DataFiles::from_config(value);
    };
    if !entries.iter().any(Value::is_mapping) {
        return DataFiles::from_config(value);
    }
    let mut splits: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in entries {
        let split = entry
            .get("split")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("each entry needs a `split` and a `path`"))?;
        let path = entry
            .get("path")
            .ok_or_else(|| anyhow!("split {split:?} has no `path`"))?;
        let DataFiles::Train(files) = DataFiles::from_config(path)? else {
            bail!("the path of split {split:?} must be a path or a list of paths");
        };
        splits.entry(split.to_string()).or_default().extend(files);
    }
    Ok(DataFiles::Splits(splits))
}

/// The config `load_dataset(dataset, name)` reads: the one called `name`; without a name the one
/// marked `default: true`, else the one called `default`, else the only one. `None` when the
/// card declares no configs and no name (other than `default`) is asked for.
pub fn choose_config<'a>(
    configs: &'a [CardConfig],
    name: Option<&str>,
    dataset: &str,
) -> Result<Option<&'a CardConfig>> {
    let names = || {
        configs
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if configs.is_empty() {
        return match name {
            None | Some("default") => Ok(None),
            Some(name) => bail!(
                "dataset {dataset} has no config {name:?}: its README.md declares no `configs`, \
                 so it has only the default one; remove `name` (wikitext_dataset: `subset: null`), \
                 or name the files to read with `data_files` (a preset that fixes the config, \
                 such as cnn_dailymail_articles_dataset, then reads them)"
            ),
        };
    }
    if let Some(name) = name {
        return configs
            .iter()
            .find(|c| c.name == name)
            .map(Some)
            .ok_or_else(|| {
                anyhow!(
                    "dataset {dataset} has no config {name:?}; its configs are: {}",
                    names()
                )
            });
    }
    let defaults: Vec<&CardConfig> = configs.iter().filter(|c| c.default).collect();
    if defaults.len() > 1 {
        bail!(
            "dataset {dataset}'s README.md marks several configs `default: true` ({}); pick one \
             with `name`",
            defaults
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let chosen = defaults
        .first()
        .copied()
        .or_else(|| configs.iter().find(|c| c.name == "default"))
        .or_else(|| (configs.len() == 1).then(|| &configs[0]));
    match chosen {
        Some(config) => Ok(Some(config)),
        None => bail!(
            "dataset {dataset} has several configs and none is the default; pick one with `name` \
             (`subset` for the presets that take one): {}",
            names()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(names: &[&str]) -> Vec<PathBuf> {
        names.iter().map(PathBuf::from).collect()
    }

    const CARD: &str = "---\nlicense: cc-by-sa-3.0\nconfigs:\n- config_name: wikitext-103-v1\n  \
        data_files:\n  - split: train\n    path: wikitext-103-v1/train-*\n  - split: test\n    \
        path:\n    - wikitext-103-v1/test-0.parquet\n    - wikitext-103-v1/test-1.parquet\n\
        - config_name: wikitext-2-v1\n  data_files: wikitext-2-v1/all.jsonl\n\
        - config_name: raw\n  data_dir: raw\n  default: true\n---\n# WikiText\n\n---\n";

    #[test]
    fn reads_every_form_of_data_files() {
        let configs = card_configs(CARD).unwrap();
        assert_eq!(configs.len(), 3);
        let mut splits = BTreeMap::new();
        splits.insert("train".into(), paths(&["wikitext-103-v1/train-*"]));
        splits.insert(
            "test".into(),
            paths(&[
                "wikitext-103-v1/test-0.parquet",
                "wikitext-103-v1/test-1.parquet",
            ]),
        );
        assert_eq!(configs[0].name, "wikitext-103-v1");
        assert_eq!(configs[0].data_files, Some(DataFiles::Splits(splits)));
        assert_eq!(
            configs[1].data_files,
            Some(DataFiles::Train(paths(&["wikitext-2-v1/all.jsonl"])))
        );
        // A config's plain list is its train split.
        assert_eq!(
            configs[1].data_files_from_root(),
            Some(DataFiles::Splits(BTreeMap::from([(
                "train".into(),
                paths(&["wikitext-2-v1/all.jsonl"])
            )])))
        );
        assert_eq!(configs[2].data_files, None);
        assert_eq!(configs[2].data_dir.as_deref(), Some("raw"));
        assert!(configs[2].default && !configs[0].default);
    }

    #[test]
    fn chooses_as_load_dataset_does() {
        let configs = card_configs(CARD).unwrap();
        let pick = |name| choose_config(&configs, name, "d").map(|c| c.map(|c| c.name.clone()));
        assert_eq!(
            pick(Some("wikitext-2-v1")).unwrap().as_deref(),
            Some("wikitext-2-v1")
        );
        // `default: true` wins when no name is given.
        assert_eq!(pick(None).unwrap().as_deref(), Some("raw"));
        let err = pick(Some("wikitext-103-raw")).unwrap_err().to_string();
        assert!(err.contains("no config \"wikitext-103-raw\""), "{err}");
        assert!(err.contains("wikitext-103-v1, wikitext-2-v1, raw"), "{err}");

        // Without a default: the config called `default`, else the only one, else an error.
        let mut two = configs[..2].to_vec();
        let err = choose_config(&two, None, "d").unwrap_err().to_string();
        assert!(err.contains("pick one with `name`"), "{err}");
        two[1].name = "default".into();
        assert_eq!(
            choose_config(&two, None, "d").unwrap().unwrap().name,
            "default"
        );
        assert_eq!(
            choose_config(&configs[..1], None, "d")
                .unwrap()
                .unwrap()
                .name,
            "wikitext-103-v1"
        );
    }

    #[test]
    fn cards_without_configs_have_only_the_default() {
        for readme in [
            "# no YAML\n",
            "---\nlicense: mit\n---\ntext",
            "---\nunterminated: 1\n",
        ] {
            let configs = card_configs(readme).unwrap();
            assert!(configs.is_empty(), "{readme}");
            assert!(choose_config(&configs, None, "d").unwrap().is_none());
            assert!(choose_config(&configs, Some("default"), "d")
                .unwrap()
                .is_none());
            let err = choose_config(&configs, Some("3.0.0"), "d")
                .unwrap_err()
                .to_string();
            assert!(err.contains("declares no `configs`"), "{err}");
        }
    }

    #[test]
    fn data_dir_prefixes_a_configs_files() {
        let config = CardConfig {
            name: "x".into(),
            data_files: Some(DataFiles::Train(paths(&["train.jsonl"]))),
            data_dir: Some("sub/".into()),
            default: false,
        };
        assert_eq!(
            config.data_files_from_root(),
            Some(DataFiles::Splits(BTreeMap::from([(
                "train".into(),
                paths(&["sub/train.jsonl"])
            )])))
        );
    }

    #[test]
    fn chosen_files_need_no_config_but_a_name_must_exist() {
        // Several configs and no default: a data_dir or data_files is enough, as in HF.
        let card = "---\nconfigs:\n- config_name: a\n  data_dir: a\n- config_name: b\n  data_dir: b\n---\n";
        assert!(config_to_read(card, None, "d", false).is_err());
        assert_eq!(config_to_read(card, None, "d", true).unwrap(), None);
        assert_eq!(config_to_read(card, Some("b"), "d", true).unwrap(), None);
        assert!(config_to_read(card, Some("c"), "d", true).is_err());
        assert_eq!(
            config_to_read(card, Some("b"), "d", false)
                .unwrap()
                .unwrap()
                .data_dir
                .as_deref(),
            Some("b")
        );
        // Without configs a preset's fixed name reads the files named.
        assert_eq!(
            config_to_read("# card", Some("3.0.0"), "d", true).unwrap(),
            None
        );
        // YAML that cannot be read is no configs, unless one is asked for.
        let broken = "---\nconfigs: [unclosed\n---\n";
        assert_eq!(config_to_read(broken, None, "d", false).unwrap(), None);
        assert!(config_to_read(broken, Some("a"), "d", false).is_err());
    }

    #[test]
    fn two_defaults_and_odd_names() {
        let card = "---\nconfigs:\n- config_name: a\n  default: true\n- config_name: b\n  default: true\n---\n";
        let err = config_to_read(card, None, "d", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("several configs `default: true` (a, b)"),
            "{err}"
        );
        assert_eq!(
            config_to_read(card, Some("b"), "d", false)
                .unwrap()
                .unwrap()
                .name,
            "b"
        );
        let card = "---\nconfigs:\n- config_name: 2022\n---\n";
        assert_eq!(card_configs(card).unwrap()[0].name, "2022");
        assert!(card_configs("---\nconfigs: null\n---\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_configs_are_named() {
        let err = card_configs("---\nconfigs:\n- data_files: a.json\n---\n").unwrap_err();
        assert!(err.to_string().contains("config_name"), "{err:#}");
        let err =
            card_configs("---\nconfigs:\n- config_name: a\n  data_files:\n  - split: train\n---\n")
                .unwrap_err();
        assert!(format!("{err:#}").contains("has no `path`"), "{err:#}");
    }
}
