//! The catalog (SPEC §5): `catalog/<standard name>.toml` files loaded into an immutable
//! snapshot. Requests read the current snapshot without locks; a reload builds a whole new
//! one and swaps it in atomically, so a bad file can never half-replace a good catalog.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use rand::Rng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use serde::Deserialize;
use toml::Spanned;

use crate::metrics::CatalogMetrics;
use crate::sign::encode_key;

/// One playable track, with its object key already percent-encoded for signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    pub title: String,
    /// `title` as a JSON string literal, quotes included, ready for the response body.
    pub title_json: String,
    pub key: String,
    /// `key` encoded once, as S3 and botocore expect it in a URL path.
    pub encoded_key: String,
    pub duration_sec: u32,
    pub active: bool,
    pub weight: u32,
}

/// One library: its active tracks and how to draw from them.
#[derive(Debug)]
pub struct Library {
    pub display_name: Option<String>,
    /// Every track in the file, active or not, in file order.
    pub tracks: Vec<Track>,
    active: Vec<usize>,
    /// Present only when weights differ, so the common case is a plain uniform draw.
    weights: Option<WeightedIndex<u32>>,
}

impl Library {
    /// Draws an active track: uniform, or weighted where weights are given.
    pub fn choose<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<&Track> {
        if self.active.is_empty() {
            return None;
        }
        let i = match &self.weights {
            Some(w) => w.sample(rng),
            None => rng.random_range(0..self.active.len()),
        };
        Some(&self.tracks[self.active[i]])
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }
}

/// An immutable catalog.
#[derive(Debug, Default)]
pub struct Catalog {
    pub libraries: HashMap<String, Library>,
    /// Increases by one on every successful load; shown in metrics and `/readyz`.
    pub version: u64,
}

/// A file that failed validation, with where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is the file as a whole.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for CatalogError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LibraryFile {
    name: Option<String>,
    #[serde(default)]
    track: Vec<Spanned<TrackFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackFile {
    title: String,
    key: String,
    duration_sec: u32,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default = "one")]
    weight: u32,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}

/// A standard name: lowercase letters, digits, `.`, `-` and `_`, starting with a letter or
/// digit (`audio.focus`). Anything else in `catalog/` is a mistake worth reporting.
pub fn is_standard_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && name.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and validates one library file.
pub fn parse_library(file: &Path, text: &str) -> Result<Library, CatalogError> {
    let err = |line: Option<usize>, message: String| CatalogError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let parsed: LibraryFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        err(line, e.message().to_string())
    })?;
    let mut tracks = Vec::with_capacity(parsed.track.len());
    for spanned in parsed.track {
        let line = Some(line_of(text, spanned.span().start));
        let t = spanned.into_inner();
        if t.title.trim().is_empty() {
            return Err(err(line, "track title is empty".into()));
        }
        if t.key.is_empty() || t.key.starts_with('/') {
            return Err(err(
                line,
                "track key must be a non-empty object key without a leading '/'".into(),
            ));
        }
        if t.duration_sec == 0 {
            return Err(err(line, "duration_sec must be at least 1".into()));
        }
        if t.weight == 0 {
            return Err(err(
                line,
                "weight must be at least 1 (set active = false to hide a track)".into(),
            ));
        }
        tracks.push(Track {
            encoded_key: encode_key(&t.key),
            title_json: serde_json::to_string(&t.title).unwrap_or_default(),
            title: t.title,
            key: t.key,
            duration_sec: t.duration_sec,
            active: t.active,
            weight: t.weight,
        });
    }
    let active: Vec<usize> = (0..tracks.len()).filter(|&i| tracks[i].active).collect();
    let weighted = active.iter().any(|&i| tracks[i].weight != 1);
    let weights = if weighted {
        Some(
            WeightedIndex::new(active.iter().map(|&i| tracks[i].weight))
                .map_err(|e| err(None, format!("weights: {e}")))?,
        )
    } else {
        None
    };
    Ok(Library {
        display_name: parsed.name,
        tracks,
        active,
        weights,
    })
}

/// Loads every `*.toml` in `dir`. Any bad file fails the whole load.
pub fn load_dir(dir: &Path, version: u64) -> Result<Catalog, CatalogError> {
    let whole = |message: String| CatalogError {
        file: dir.to_path_buf(),
        line: None,
        message,
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| whole(format!("cannot read directory: {e}")))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| whole(e.to_string()))?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut libraries = HashMap::with_capacity(paths.len());
    for path in paths {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if !is_standard_name(&name) {
            return Err(CatalogError {
                file: path,
                line: None,
                message: format!(
                    "'{name}' is not a standard library name (lowercase letters, digits, '.', '-', '_')"
                ),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CatalogError {
            file: path.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        libraries.insert(name, parse_library(&path, &text)?);
    }
    Ok(Catalog { libraries, version })
}

/// The live catalog: the current snapshot and the directory it is reloaded from.
pub struct CatalogHandle {
    dir: PathBuf,
    current: ArcSwap<Catalog>,
    versions: AtomicU64,
    pub metrics: CatalogMetrics,
}

impl CatalogHandle {
    /// Loads `dir` once; start-up fails if the catalog is bad.
    pub fn load(dir: impl Into<PathBuf>) -> Result<Self, CatalogError> {
        let dir = dir.into();
        let catalog = load_dir(&dir, 1)?;
        let metrics = CatalogMetrics::new();
        metrics.version.set(1);
        Ok(Self {
            dir,
            current: ArcSwap::from_pointee(catalog),
            versions: AtomicU64::new(1),
            metrics,
        })
    }

    /// The current snapshot: a lock-free read, cheap enough for every request.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.current.load()
    }

    /// Rebuilds the snapshot from disk. On error the old snapshot stays and the error is
    /// logged with the file and line.
    pub fn reload(&self) -> Result<u64, CatalogError> {
        let version = self.versions.load(Ordering::Relaxed) + 1;
        match load_dir(&self.dir, version) {
            Ok(catalog) => {
                let libraries = catalog.libraries.len();
                self.current.store(Arc::new(catalog));
                self.versions.store(version, Ordering::Relaxed);
                self.metrics.version.set(version as i64);
                log::info!(
                    "catalog reloaded from {}: version {version}, {libraries} libraries",
                    self.dir.display()
                );
                Ok(version)
            }
            Err(e) => {
                self.metrics.load_errors.inc();
                log::error!(
                    "catalog reload failed, keeping version {}: {e}",
                    version - 1
                );
                Err(e)
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn parse(text: &str) -> Result<Library, CatalogError> {
        parse_library(Path::new("audio.test.toml"), text)
    }

    #[test]
    fn parses_defaults_and_encodes_keys() {
        let lib = parse(
            r#"
name = "Test"
[[track]]
title = "A"
key = "dir/a b+é.mp3"
duration_sec = 10
[[track]]
title = "B"
key = "b.mp3"
duration_sec = 20
active = false
"#,
        )
        .unwrap();
        assert_eq!(lib.display_name.as_deref(), Some("Test"));
        assert_eq!(lib.active_count(), 1);
        assert_eq!(lib.tracks[0].encoded_key, "dir/a%20b%2B%C3%A9.mp3");
        assert!(lib.tracks[0].active && lib.tracks[0].weight == 1);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(lib.choose(&mut rng).unwrap().title, "A");
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("[[track]]\ntitle = \"A\"\nkey = \"a\"\n", 1, "duration_sec"),
            (
                "name = \"x\"\n\n[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = 0\n",
                3,
                "duration_sec must be at least 1",
            ),
            (
                "[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = 5\nweight = 0\n",
                1,
                "weight",
            ),
            (
                "[[track]]\ntitle = \"\"\nkey = \"a\"\nduration_sec = 5\n",
                1,
                "title",
            ),
            (
                "[[track]]\ntitle = \"A\"\nkey = \"/a\"\nduration_sec = 5\n",
                1,
                "key",
            ),
            ("name = \"x\"\nbogus = 1\n", 2, "bogus"),
            ("name = \"x\"\n[[track]\n", 2, ""),
            (
                "[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = -5\n",
                4,
                "",
            ),
        ];
        for (text, line, needle) in cases {
            let e = parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text:?}"));
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("audio.test.toml:{line}: "))
            );
        }
    }

    #[test]
    fn empty_and_inactive_libraries_have_nothing_to_choose() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(parse("name = \"x\"\n").unwrap().choose(&mut rng).is_none());
        let lib =
            parse("[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = 5\nactive = false\n")
                .unwrap();
        assert!(lib.choose(&mut rng).is_none());
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let lib = parse(
            "[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = 5\nweight = 3\n\
             [[track]]\ntitle = \"B\"\nkey = \"b\"\nduration_sec = 5\nweight = 1\n\
             [[track]]\ntitle = \"C\"\nkey = \"c\"\nduration_sec = 5\nweight = 9\nactive = false\n",
        )
        .unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let n = 40_000;
        let a = (0..n)
            .filter(|_| lib.choose(&mut rng).unwrap().title == "A")
            .count();
        // Expect 3/4; 40k draws put 5 standard deviations at about ±0.011.
        let share = a as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share of A: {share}");
    }

    #[test]
    fn uniform_choice_reaches_every_track() {
        let text: String = (0..5)
            .map(|i| format!("[[track]]\ntitle = \"T{i}\"\nkey = \"k{i}\"\nduration_sec = 5\n"))
            .collect();
        let lib = parse(&text).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            seen.insert(lib.choose(&mut rng).unwrap().title.clone());
        }
        assert_eq!(seen.len(), 5);
    }

    #[test]
    fn standard_names() {
        for ok in ["audio.focus", "audio.sleep-2", "a", "x_y.z"] {
            assert!(is_standard_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "Audio.Focus", "audio focus", "audio/x", "é"] {
            assert!(!is_standard_name(bad), "{bad}");
        }
    }
}
