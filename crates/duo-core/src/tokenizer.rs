//! CLIP's byte-level BPE tokenizer, id for id the same as transformers' `CLIPTokenizer`.
//!
//! Upstream has two text pipelines, which agree on ordinary prompts and differ on unusual text:
//! - [`Flavor::Tokenizers`] (the default): the `tokenizers`-backed pipeline, i.e. `CLIPTokenizer` in
//!   transformers 5 and `CLIPTokenizerFast` in transformers 4: NFC, every `\s+` run to one space,
//!   lowercase char by char, the CLIP split regex, GPT-2's split regex on each piece, byte-level
//!   mapping, BPE.
//! - [`Flavor::Slow`]: transformers 4's Python `CLIPTokenizer` without ftfy, which runs
//!   `BasicTokenizer(strip_accents=False, do_split_on_punc=False)` instead: it drops control and
//!   unassigned characters, puts spaces around CJK ideographs, applies NFC, lowercases word by word with
//!   Python's `str.lower` (which knows the Greek final sigma), and compiles the split regex with
//!   `re.IGNORECASE`.
//!
//! In both, added tokens (the special tokens, SD 2's pad token "!") are split out of the text first.
//! Both folder layouts load: `vocab.json` + `merges.txt`, or `tokenizer.json` alone, each with the
//! optional `tokenizer_config.json` / `special_tokens_map.json` beside it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use unicode_normalization::UnicodeNormalization;

use crate::error::{DuoError, Result, read_json, read_to_string};

const BOS_TEXT: &str = "<|startoftext|>";
const EOS_TEXT: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// Used when `tokenizer_config.json` does not say: the length of CLIP's position embedding, as in
/// transformers' old `max_model_input_sizes` for every CLIP checkpoint.
const DEFAULT_MODEL_MAX_LENGTH: usize = 77;

/// The CLIP split regex, as `tokenizers` runs it (case-sensitive).
const WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The same regex as the `regex` package runs it under `re.IGNORECASE`. Checked against it on every
/// assigned code point: the flag only matters for the literal alternatives (`'ſ` is a contraction,
/// ſ folding to s), and the package then also leaves U+0345 (which folds to ι) out of the punctuation
/// class without counting it as a letter, so the slow tokenizer silently drops it.
const SLOW_WORD_PATTERN: &str = concat!(
    r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)",
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"
);

/// GPT-2's split regex, which `pre_tokenizers.ByteLevel` applies to each piece, less its optional leading
/// space and its whitespace alternatives: the pieces it sees hold no whitespace.
const GPT2_WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

static WORDS: LazyLock<Regex> = LazyLock::new(|| compile(WORD_PATTERN));
static GPT2_WORDS: LazyLock<Regex> = LazyLock::new(|| compile(GPT2_WORD_PATTERN));
static SLOW_WORDS: LazyLock<Regex> = LazyLock::new(|| compile(SLOW_WORD_PATTERN));
/// `normalizers.Replace(Regex(r"\s+"), " ")`.
static WHITESPACE_RUNS: LazyLock<Regex> = LazyLock::new(|| compile(r"\s+"));
/// `BasicTokenizer._clean_text` drops NUL, U+FFFD and every category-C character (control, format,
/// private use, unassigned) except tab, LF and CR ...
static DROPPED: LazyLock<Regex> = LazyLock::new(|| compile(r"[\x{FFFD}\p{C}--[\t\n\r]]"));
/// ... and turns those three and the space separators (Zs) into a plain space.
static SPACES: LazyLock<Regex> = LazyLock::new(|| compile(r"[\t\n\r\p{Zs}]"));
/// `BasicTokenizer._is_chinese_char`: the CJK ideograph blocks it surrounds with spaces.
static CJK: LazyLock<Regex> = LazyLock::new(|| {
    compile(concat!(
        r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}",
        r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]"
    ))
});

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant pattern")
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 (controls,
/// space, NBSP, soft hyphen) move to U+0100.. in byte order, so no BPE symbol is blank or a control.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let (mut byte, mut shifted) = (0u32, 0u32);
    while byte < 256 {
        let code = if matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
            byte
        } else {
            shifted += 1;
            0xFF + shifted
        };
        table[byte as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("below the surrogates"),
        };
        byte += 1;
    }
    table
};

/// Which upstream text pipeline to reproduce (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flavor {
    /// `tokenizers`-backed: transformers 5 `CLIPTokenizer`, transformers 4 `CLIPTokenizerFast`.
    #[default]
    Tokenizers,
    /// transformers 4 Python `CLIPTokenizer` with ftfy not installed.
    Slow,
}

/// A token matched in the text before BPE, as transformers' added-tokens trie / tokenizers'
/// `AddedVocabulary` do: the special tokens and any token added to the vocabulary.
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    /// `tokenizers` matches a normalized token after normalisation (so after lowercasing), the others
    /// in the raw text. The slow tokenizer matches all of them in the raw text.
    normalized: bool,
    special: bool,
}

/// CLIP's tokenizer as SD pipelines load it from their `tokenizer/` folder.
#[derive(Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// id → token for the vocabulary and the added tokens.
    tokens: HashMap<u32, String>,
    /// `"left right"` → rank (lower merges first).
    merge_ranks: HashMap<String, u32>,
    /// Longest first, so the first match at a position is the longest.
    added: Vec<AddedToken>,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: u32,
    model_max_length: usize,
    flavor: Flavor,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merge_ranks.len())
            .field("added", &self.added)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("model_max_length", &self.model_max_length)
            .field("flavor", &self.flavor)
            .finish()
    }
}

impl ClipTokenizer {
    /// Reads a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, or `tokenizer.json` alone
    /// (newer saves); `tokenizer_config.json` / `special_tokens_map.json` beside them give the special
    /// tokens (the pad token above all) and `model_max_length` when present.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer folder not found");
            return Err(DuoError::io(dir, missing));
        }
        let vocab_path = dir.join("vocab.json");
        let json_path = dir.join("tokenizer.json");
        let files = if vocab_path.is_file() {
            ModelFiles::from_vocab_and_merges(&vocab_path, &dir.join("merges.txt"))?
        } else if json_path.is_file() {
            ModelFiles::from_tokenizer_json(&json_path)?
        } else {
            return Err(DuoError::config(dir, "no vocab.json + merges.txt and no tokenizer.json"));
        };
        let config: TokenConfig = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map: TokenConfig = read_optional_json(&dir.join("special_tokens_map.json"))?;
        Self::build(files, config, map)
    }

    /// The same vocabulary, run through the other upstream text pipeline.
    pub fn with_flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// BOS + BPE ids + EOS, no truncation or padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(self.content_ids(text));
        ids.push(self.eos);
        ids
    }

    /// As SD pipelines call it (`padding="max_length", truncation=True`): the text's ids cut to
    /// `max_len - 2`, wrapped in BOS/EOS (so EOS stays last), then padded with the pad token to `max_len`.
    /// A `max_len` below 2 still gives `[BOS, EOS]`.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Vec<u32> {
        let mut content = self.content_ids(text);
        content.truncate(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(max_len.max(2));
        ids.push(self.bos);
        ids.extend(content);
        ids.push(self.eos);
        ids.resize(ids.len().max(max_len), self.pad);
        ids
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The BPE vocabulary's size (`len(tokenizer.encoder)`), without tokens added beyond it.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        let added = self.added.iter().find(|t| t.content == token).map(|t| t.id);
        added.or_else(|| self.vocab.get(token).copied())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(&id).map(String::as_str)
    }

    /// Text for `ids`, as `decode(ids, skip_special_tokens=True)`: special tokens skipped, symbols mapped
    /// back to bytes (invalid UTF-8 becomes U+FFFD), each `</w>` a space, the ends trimmed. Unknown ids
    /// are skipped; no `clean_up_tokenization_spaces`.
    pub fn decode(&self, ids: &[u32]) -> String {
        let special: HashSet<u32> = self.added.iter().filter(|t| t.special).map(|t| t.id).collect();
        let mut bytes = Vec::new();
        for token in ids.iter().filter(|id| !special.contains(id)).filter_map(|&id| self.id_to_token(id)) {
            for c in token.chars() {
                match BYTE_TO_CHAR.iter().position(|&mapped| mapped == c) {
                    Some(byte) => bytes.push(byte as u8),
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ").trim().to_owned()
    }

    /// The ids of `text` without BOS/EOS.
    fn content_ids(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        match self.flavor {
            // transformers 4 `PreTrainedTokenizer.tokenize`: split on every added token in the raw text,
            // then `_tokenize` each stretch between them.
            Flavor::Slow => {
                for piece in self.split_added(text, |_| true) {
                    match piece {
                        Piece::Added(id) => ids.push(id),
                        Piece::Text(stretch) => self.push_word_ids(&basic_tokenizer(stretch), &mut ids),
                    }
                }
            }
            // tokenizers `AddedVocabulary::extract_and_normalize`: non-normalized tokens are found in the
            // raw text, normalized ones in each normalised stretch.
            Flavor::Tokenizers => {
                for piece in self.split_added(text, |t| !t.normalized) {
                    match piece {
                        Piece::Added(id) => ids.push(id),
                        Piece::Text(stretch) => {
                            let normalized = tokenizers_normalize(stretch);
                            for inner in self.split_added(&normalized, |t| t.normalized) {
                                match inner {
                                    Piece::Added(id) => ids.push(id),
                                    Piece::Text(rest) => self.push_word_ids(rest, &mut ids),
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// Splits `text` around the added tokens that `select` keeps, leftmost then longest match.
    fn split_added<'a>(&self, text: &'a str, select: impl Fn(&AddedToken) -> bool) -> Vec<Piece<'a>> {
        let mut pieces = Vec::new();
        let (mut start, mut at) = (0, 0);
        while let Some(rest) = text.get(at..).filter(|rest| !rest.is_empty()) {
            match self.added.iter().find(|t| select(t) && rest.starts_with(t.content.as_str())) {
                Some(token) => {
                    if start < at {
                        pieces.push(Piece::Text(&text[start..at]));
                    }
                    pieces.push(Piece::Added(token.id));
                    at += token.content.len();
                    start = at;
                }
                None => at += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            pieces.push(Piece::Text(&text[start..]));
        }
        pieces
    }

    /// Splits normalised text into words with the CLIP regex and appends each word's BPE ids.
    fn push_word_ids(&self, text: &str, ids: &mut Vec<u32>) {
        match self.flavor {
            Flavor::Tokenizers => {
                // `pre_tokenizers.ByteLevel(use_regex=True)` splits every piece again with GPT-2's regex.
                // That only changes a special token's text that reached this point (a casing variant of a
                // non-normalized token): "<|endoftext|>" becomes "<|", "endoftext", "|>".
                for piece in WORDS.find_iter(text) {
                    for word in GPT2_WORDS.find_iter(piece.as_str()) {
                        self.push_bpe_ids(word.as_str(), ids);
                    }
                }
            }
            Flavor::Slow => {
                for word in SLOW_WORDS.find_iter(text).map(|m| m.as_str()) {
                    // The slow tokenizer seeds its BPE cache with the two special tokens, so a special
                    // token the added-token split missed (a casing variant, lowercased since) comes out whole.
                    if word == BOS_TEXT || word == EOS_TEXT {
                        ids.push(self.token_to_id(word).unwrap_or(self.unk));
                    } else {
                        self.push_bpe_ids(word, ids);
                    }
                }
            }
        }
    }

    /// Byte-level maps `word`, runs BPE and appends the symbols' ids (unknown symbols: the unk id).
    fn push_bpe_ids(&self, word: &str, ids: &mut Vec<u32>) {
        let mapped: String = word.bytes().map(|b| BYTE_TO_CHAR[usize::from(b)]).collect();
        ids.extend(self.bpe(&mapped).iter().map(|s| self.vocab.get(s).copied().unwrap_or(self.unk)));
    }

    /// `CLIPTokenizer.bpe`: start from the word's characters with `</w>` on the last one, then merge the
    /// adjacent pair of lowest rank, every occurrence left to right, until no adjacent pair has a rank.
    /// (tokenizers' priority-queue merge gives the same symbols.)
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        let mut key = String::new();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for (i, pair) in symbols.windows(2).enumerate() {
                key.clear();
                key.push_str(&pair[0]);
                key.push(' ');
                key.push_str(&pair[1]);
                if let Some(&rank) = self.merge_ranks.get(&key)
                    && best.is_none_or(|(best_rank, _)| rank < best_rank)
                {
                    best = Some((rank, i));
                }
            }
            let Some((_, at)) = best else { return symbols };
            let (first, second) = (symbols[at].clone(), symbols[at + 1].clone());
            let mut merged = Vec::with_capacity(symbols.len() - 1);
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
    }

    fn build(files: ModelFiles, config: TokenConfig, map: TokenConfig) -> Result<Self> {
        let ModelFiles { source, vocab, merges, mut added, defaults } = files;
        // special_tokens_map.json wins over tokenizer_config.json, as in `from_pretrained`; a file that
        // names no token leaves CLIPTokenizer's defaults (`<|endoftext|>` for unk and pad).
        let pick = |from_map: Option<TokenSpec>,
                    from_config: Option<TokenSpec>,
                    fallback: Option<String>,
                    default: &str| {
            from_map
                .or(from_config)
                .unwrap_or_else(|| TokenSpec::Plain(fallback.unwrap_or_else(|| default.to_owned())))
        };
        let bos = pick(map.bos_token, config.bos_token, defaults.bos, BOS_TEXT);
        let eos = pick(map.eos_token, config.eos_token, defaults.eos, EOS_TEXT);
        let unk = pick(map.unk_token, config.unk_token, defaults.unk, EOS_TEXT);
        let pad = pick(map.pad_token, config.pad_token, defaults.pad, EOS_TEXT);

        for (key, spec) in config.added_tokens_decoder {
            let id = key.parse().map_err(|_| {
                DuoError::parse(&source, format!("added_tokens_decoder key {key:?} is not a token id"))
            })?;
            if !added.iter().any(|t| t.content == spec.content()) {
                added.push(AddedToken {
                    content: spec.content().to_owned(),
                    id,
                    normalized: spec.normalized(),
                    special: spec.special(),
                });
            }
        }
        // transformers registers the special tokens as added tokens too, in this order; one named twice
        // (CLIP's eos, unk and pad are one token) keeps the flags of its last mention. This is why SD 2's
        // pad token "!" is split out of the text ("hi!!" gives two "!" tokens, not "!!</w>").
        let listed: HashSet<String> = added.iter().map(|t| t.content.clone()).collect();
        let mut special_ids = [0; 4];
        for (slot, spec) in special_ids.iter_mut().zip([&bos, &eos, &unk, &pad]) {
            let content = spec.content();
            if let Some(token) = added.iter_mut().find(|t| t.content == content) {
                token.special = true;
                if !listed.contains(content) {
                    token.normalized = spec.normalized();
                }
                *slot = token.id;
                continue;
            }
            let Some(&id) = vocab.get(content) else {
                return Err(DuoError::config(
                    &source,
                    format!("special token {content:?} is not in the vocabulary"),
                ));
            };
            added.push(AddedToken {
                content: content.to_owned(),
                id,
                normalized: spec.normalized(),
                special: true,
            });
            *slot = id;
        }
        let [bos, eos, unk, pad] = special_ids;
        added.retain(|t| !t.content.is_empty());
        added.sort_by_key(|t| std::cmp::Reverse(t.content.len()));

        let mut tokens: HashMap<u32, String> = vocab.iter().map(|(token, &id)| (id, token.clone())).collect();
        tokens.extend(added.iter().map(|t| (t.id, t.content.clone())));
        // A merge listed twice keeps its later rank, as with Python's `dict(zip(merges, range(...)))`.
        let merge_ranks = merges
            .into_iter()
            .zip(0u32..)
            .map(|((left, right), rank)| (format!("{left} {right}"), rank))
            .collect();
        // A huge `model_max_length` (transformers writes 1e30 for "no limit") saturates.
        let model_max_length = config
            .model_max_length
            .filter(|len| *len >= 0.0)
            .map_or(DEFAULT_MODEL_MAX_LENGTH, |len| len as usize);
        Ok(Self {
            vocab,
            tokens,
            merge_ranks,
            added,
            bos,
            eos,
            pad,
            unk,
            model_max_length,
            flavor: Flavor::default(),
        })
    }
}

enum Piece<'a> {
    Text(&'a str),
    Added(u32),
}

/// The `tokenizers` normalizer: `Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])`. Its
/// Lowercase maps char by char (no final-sigma rule).
fn tokenizers_normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    WHITESPACE_RUNS.replace_all(&nfc, " ").chars().flat_map(char::to_lowercase).collect()
}

/// `" ".join(BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize(text))`: clean, space
/// out CJK, NFC, split on whitespace, lowercase each word. `strip_accents=False` means no NFD and no
/// accent stripping even though lowercasing is on. `str::to_lowercase` applies the same final-sigma rule
/// as Python's `str.lower`.
fn basic_tokenizer(text: &str) -> String {
    let cleaned = DROPPED.replace_all(text, "");
    let cleaned = SPACES.replace_all(&cleaned, " ");
    let spaced = CJK.replace_all(&cleaned, " $0 ");
    let nfc: String = spaced.nfc().collect();
    nfc.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// A special or added token as transformers writes it: a plain string or an `AddedToken` dict.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Full { content: String, normalized: Option<bool>, special: Option<bool> },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            Self::Plain(content) | Self::Full { content, .. } => content,
        }
    }

    /// transformers registers a special token given as a plain string with `normalized=False`.
    fn normalized(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Full { normalized, special, .. } => normalized.unwrap_or(!special.unwrap_or(false)),
        }
    }

    fn special(&self) -> bool {
        matches!(self, Self::Full { special: Some(true), .. })
    }
}

/// The keys of `tokenizer_config.json` and `special_tokens_map.json` that matter here.
#[derive(Default, Deserialize)]
struct TokenConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
    #[serde(default)]
    added_tokens_decoder: HashMap<String, TokenSpec>,
}

fn read_optional_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    if path.exists() { read_json(path) } else { Ok(T::default()) }
}

/// What the vocabulary files themselves say.
struct ModelFiles {
    /// The file named in errors about the vocabulary.
    source: PathBuf,
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    added: Vec<AddedToken>,
    defaults: SpecialDefaults,
}

/// Special tokens a `tokenizer.json` implies (post-processor, model, padding), used when neither config
/// file names them.
#[derive(Default)]
struct SpecialDefaults {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
}

impl ModelFiles {
    fn from_vocab_and_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let vocab = read_json(vocab_path)?;
        let merges = parse_merges(&read_to_string(merges_path)?, merges_path)?;
        Ok(Self {
            source: vocab_path.to_owned(),
            vocab,
            merges,
            added: Vec::new(),
            defaults: SpecialDefaults::default(),
        })
    }

    fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let file: TokenizerJson = read_json(path)?;
        let model = file.model;
        if model.kind.as_deref().is_some_and(|kind| kind != "BPE") {
            return Err(DuoError::config(path, format!("model type {:?}, expected BPE", model.kind)));
        }
        if model.end_of_word_suffix.as_deref().is_some_and(|suffix| suffix != END_OF_WORD) {
            let message =
                format!("end_of_word_suffix {:?}, expected {END_OF_WORD:?}", model.end_of_word_suffix);
            return Err(DuoError::config(path, message));
        }
        let merges = model.merges.into_iter().map(Merge::into_pair).collect::<Option<Vec<_>>>();
        let merges = merges.ok_or_else(|| DuoError::parse(path, "a merge is not two symbols"))?;
        let added = file
            .added_tokens
            .into_iter()
            .map(|t| AddedToken {
                content: t.content,
                id: t.id,
                normalized: t.normalized,
                special: t.special,
            })
            .collect();
        let (bos, eos) = file.post_processor.as_ref().and_then(wrapping_tokens).unzip();
        let defaults =
            SpecialDefaults { bos, eos, unk: model.unk_token, pad: file.padding.and_then(|p| p.pad_token) };
        Ok(Self { source: path.to_owned(), vocab: model.vocab, merges, added, defaults })
    }
}

/// `merges.txt`: a `#version` header, then one `left right` pair per line in rank order. Only the header
/// is skipped: real merges may start with '#' (`# #</w>`).
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(left), Some(right), None) => merges.push((left.to_owned(), right.to_owned())),
            _ => {
                return Err(DuoError::parse(
                    path,
                    format!("line {}: {line:?} is not two symbols", index + 1),
                ));
            }
        }
    }
    Ok(merges)
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: BpeModel,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    padding: Option<Padding>,
    post_processor: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct BpeModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<Merge>,
    unk_token: Option<String>,
    end_of_word_suffix: Option<String>,
}

/// tokenizers < 0.20 writes a merge as `"left right"`, later versions as `["left", "right"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Joined(String),
    Pair(String, String),
}

impl Merge {
    fn into_pair(self) -> Option<(String, String)> {
        match self {
            Self::Pair(left, right) => Some((left, right)),
            Self::Joined(joined) => {
                let (left, right) = joined.split_once(' ')?;
                (!right.contains(' ')).then(|| (left.to_owned(), right.to_owned()))
            }
        }
    }
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
    #[serde(default)]
    normalized: bool,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct Padding {
    pad_token: Option<String>,
}

/// The tokens a post-processor wraps a sequence in: `cls` and `sep` of a RobertaProcessing (what CLIP
/// saves) or BertProcessing, also inside a `Sequence` of processors.
fn wrapping_tokens(processor: &serde_json::Value) -> Option<(String, String)> {
    match processor.get("type")?.as_str()? {
        "RobertaProcessing" | "BertProcessing" => {
            let name = |key: &str| processor.get(key)?.get(0)?.as_str().map(str::to_owned);
            Some((name("cls")?, name("sep")?))
        }
        "Sequence" => processor.get("processors")?.as_array()?.iter().find_map(wrapping_tokens),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: the 256 byte symbols, the same with `</w>`, a few merges, the two specials.
    fn toy(merges: &[(&str, &str)]) -> ClipTokenizer {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let symbols = BYTE_TO_CHAR.iter().map(|c| c.to_string());
        for symbol in symbols.clone().chain(symbols.map(|s| s + END_OF_WORD)) {
            let id = vocab.len() as u32;
            vocab.insert(symbol, id);
        }
        for (left, right) in merges {
            let id = vocab.len() as u32;
            vocab.entry(format!("{left}{right}")).or_insert(id);
        }
        for special in [BOS_TEXT, EOS_TEXT] {
            let id = vocab.len() as u32;
            vocab.insert(special.to_owned(), id);
        }
        let merges = merges.iter().map(|(l, r)| (l.to_string(), r.to_string())).collect();
        let files = ModelFiles {
            source: PathBuf::from("toy"),
            vocab,
            merges,
            added: Vec::new(),
            defaults: SpecialDefaults::default(),
        };
        ClipTokenizer::build(files, TokenConfig::default(), TokenConfig::default()).expect("toy vocabulary")
    }

    fn symbols(tok: &ClipTokenizer, text: &str) -> Vec<String> {
        let ids = tok.encode(text);
        ids[1..ids.len() - 1].iter().map(|&id| tok.id_to_token(id).unwrap_or("?").to_owned()).collect()
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let distinct: HashSet<char> = BYTE_TO_CHAR.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(BYTE_TO_CHAR[usize::from(b'a')], 'a');
        assert_eq!(BYTE_TO_CHAR[0], '\u{100}');
        assert_eq!(BYTE_TO_CHAR[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        assert!(BYTE_TO_CHAR.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }

    #[test]
    fn bpe_merges_the_lowest_rank_first() {
        let tok = toy(&[("b", "c"), ("a", "b")]);
        assert_eq!(symbols(&tok, "abcd"), ["a", "bc", "d</w>"]);
        assert_eq!(symbols(&tok, "x"), ["x</w>"]);
    }

    #[test]
    fn bpe_merges_every_occurrence_left_to_right() {
        let tok = toy(&[("a", "a"), ("aa", "a</w>")]);
        assert_eq!(symbols(&tok, "aaa"), ["aaa</w>"]);
        assert_eq!(symbols(&tok, "aaaa"), ["aa", "a", "a</w>"]);
        assert_eq!(symbols(&tok, "aaaaa"), ["aa", "aaa</w>"]);
    }

    #[test]
    fn tokenizers_normalizer() {
        assert_eq!(tokenizers_normalize("A\tB \u{3000} C\u{2028}d"), "a b c d");
        assert_eq!(tokenizers_normalize("Cafe\u{301}"), "caf\u{e9}");
        // char-by-char lowercasing: no final sigma; control characters stay
        assert_eq!(tokenizers_normalize("\u{39f}\u{394}\u{39f}\u{3a3}"), "\u{3bf}\u{3b4}\u{3bf}\u{3c3}");
        assert_eq!(tokenizers_normalize("a\u{7}b"), "a\u{7}b");
    }

    #[test]
    fn basic_tokenizer_cleans_spaces_cjk_and_lowercases_words() {
        assert_eq!(basic_tokenizer("  A\tB \u{3000} C\u{2028}d "), "a b c d");
        assert_eq!(basic_tokenizer("\u{39f}\u{394}\u{39f}\u{3a3} x"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2} x");
        // control, format, private-use and unassigned characters, NUL and U+FFFD are dropped
        assert_eq!(basic_tokenizer("a\u{7}b\u{200b}c\u{e000}d\u{378}e\0f\u{fffd}g"), "abcdefg");
        assert_eq!(basic_tokenizer("\u{4f60}\u{597d}ok"), "\u{4f60} \u{597d} ok");
        // no accent stripping, NFC composes
        assert_eq!(basic_tokenizer("Cafe\u{301} NA\u{ef}VE"), "caf\u{e9} na\u{ef}ve");
    }

    fn words(regex: &Regex, text: &str) -> Vec<String> {
        regex.find_iter(text).map(|m| m.as_str().to_owned()).collect()
    }

    #[test]
    fn split_regexes() {
        let text = "it's a 12-step <|endoftext|> plan!!";
        let expected = ["it", "'s", "a", "1", "2", "-", "step", "<|endoftext|>", "plan", "!!"];
        assert_eq!(words(&WORDS, text), expected);
        assert_eq!(words(&SLOW_WORDS, text), expected);
        // re.IGNORECASE: ſ folds to s, and U+0345 falls through every class
        assert_eq!(words(&SLOW_WORDS, "it'\u{17f} \u{345}x"), ["it", "'\u{17f}", "x"]);
        assert_eq!(words(&WORDS, "it'\u{17f} \u{345}x"), ["it", "'", "\u{17f}", "\u{345}", "x"]);
    }

    #[test]
    fn added_tokens_split_the_raw_text() {
        let tok = toy(&[]);
        let eos = tok.eos_id();
        for flavor in [Flavor::Tokenizers, Flavor::Slow] {
            let tok = tok.clone().with_flavor(flavor);
            let ids = tok.encode("a<|endoftext|>b");
            assert_eq!(
                ids[1..].iter().map(|&id| tok.id_to_token(id).unwrap_or("?")).collect::<Vec<_>>(),
                ["a</w>", EOS_TEXT, "b</w>", EOS_TEXT]
            );
        }
        // A casing variant: the slow tokenizer's BPE cache still returns the special token; tokenizers
        // does not match a non-normalized token after lowercasing, so it runs BPE on it.
        // tokenizers then splits it again with GPT-2's regex: "<|", "endoftext", "|>".
        let shout = "<|ENDOFTEXT|>";
        assert_eq!(tok.clone().with_flavor(Flavor::Slow).encode(shout)[1], eos);
        assert_eq!(symbols(&tok, shout)[..2], ["<", "|</w>"]);
    }

    #[test]
    fn padding_and_truncation() {
        let tok = toy(&[]);
        let (bos, eos, pad) = (tok.bos_id(), tok.eos_id(), tok.pad_id());
        assert_eq!(pad, eos, "CLIPTokenizer pads with <|endoftext|> unless told otherwise");
        let x = tok.token_to_id("x</w>").unwrap_or(u32::MAX);
        assert_eq!(tok.encode_padded("x", 5), [bos, x, eos, pad, pad]);
        let long = tok.encode_padded(&"x ".repeat(100), 77);
        assert_eq!(long.len(), 77);
        assert_eq!((long[0], long[75], long[76]), (bos, x, eos));
        assert_eq!(tok.encode_padded("x", 0), [bos, eos]);
    }

    #[test]
    fn decode_skips_specials_and_maps_bytes_back() {
        let tok = toy(&[("h", "i</w>")]);
        let ids = tok.encode_padded("hi caf\u{e9} \u{1f600}", 12);
        assert_eq!(tok.decode(&ids), "hi caf\u{e9} \u{1f600}");
        let lone_continuation_byte = tok.token_to_id(&BYTE_TO_CHAR[0x80].to_string()).unwrap_or(u32::MAX);
        assert_eq!(tok.decode(&[tok.bos_id(), lone_continuation_byte]), "\u{fffd}");
        assert_eq!(tok.decode(&[u32::MAX]), "");
    }

    #[test]
    fn merges_file_parsing() {
        let path = Path::new("merges.txt");
        let merges = parse_merges("#version: 0.2\ni n\n# #</w>\n\n", path).expect("valid merges");
        assert_eq!(merges, [("i".into(), "n".into()), ("#".into(), "#</w>".into())]);
        let err = parse_merges("#version: 0.2\ni n x\n", path).expect_err("three symbols");
        assert!(err.to_string().contains("merges.txt: line 2"), "{err}");
        assert_eq!(Merge::Joined("a b".into()).into_pair(), Some(("a".into(), "b".into())));
        assert_eq!(Merge::Pair("a".into(), "b c".into()).into_pair(), Some(("a".into(), "b c".into())));
        assert_eq!(Merge::Joined("ab".into()).into_pair(), None);
    }

    #[test]
    fn post_processor_names_bos_and_eos() {
        let roberta = serde_json::json!({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]});
        let expected = Some(("<s>".to_owned(), "</s>".to_owned()));
        assert_eq!(wrapping_tokens(&roberta), expected);
        let sequence =
            serde_json::json!({"type": "Sequence", "processors": [{"type": "ByteLevel"}, roberta]});
        assert_eq!(wrapping_tokens(&sequence), expected);
        assert_eq!(wrapping_tokens(&serde_json::json!({"type": "ByteLevel"})), None);
    }
}
