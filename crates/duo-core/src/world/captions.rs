//! Captions from templates, the fixed prompts the unlearning and its evaluation use, and a
//! word-lookup parser that reads a caption back to its labels.
//!
//! A caption is `[style prefix] [article] NOUN-PHRASE [on a BACKGROUND] [, style suffix]` where
//! the noun phrase is "COLOUR SHAPE" or "SHAPE in COLOUR", e.g. "a red cross",
//! "a drawing of an x mark in crimson on a dark background", "plus sign in blue, flat icon".

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::vocab::{Background, Colour, Shape};
use super::{Scene, pick, unit};
use crate::error::{DuoError, Result};

/// Which words a caption may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CaptionSplit {
    /// Every synonym, held-out ones included: the base model must know them all.
    Pretrain,
    /// No held-out word: captions the unlearning data may contain.
    Unlearn,
}

// Frequencies. Shape words bind slowly in a tiny model (toy-world-notes.md), so the canonical
// shape word dominates, while each synonym still appears in a few percent of captions, enough
// for the base model to learn the held-out paraphrases it will be attacked with.
const P_CANONICAL_SHAPE: f32 = 0.4;
const P_CANONICAL_COLOUR: f32 = 0.6;
/// "red cross" vs "a red cross".
const P_ARTICLE: f32 = 0.75;
/// "a cross in red" vs "a red cross": word-order variety.
const P_COLOUR_AFTER: f32 = 0.25;
const P_BACKGROUND: f32 = 0.25;
const P_STYLE_PREFIX: f32 = 0.15;
const P_STYLE_SUFFIX: f32 = 0.10;

/// Style words carry no label: none contains a shape, colour or background word.
const STYLE_PREFIXES: [&str; 5] =
    ["a drawing of", "a picture of", "an image of", "a simple icon of", "clip art of"];
const STYLE_SUFFIXES: [&str; 3] = ["simple icon", "flat icon", "flat illustration"];

/// A random caption for `scene`, using only the words `split` allows.
pub fn caption(scene: &Scene, rng: &mut impl RngCore, split: CaptionSplit) -> String {
    let shape_words: Vec<&str> = match split {
        CaptionSplit::Pretrain => {
            scene.shape.shared_words().iter().chain(scene.shape.held_out_words()).copied().collect()
        }
        CaptionSplit::Unlearn => scene.shape.shared_words().to_vec(),
    };
    let shape = choose(rng, &shape_words, P_CANONICAL_SHAPE);
    let colour = choose(rng, scene.colour.words(), P_CANONICAL_COLOUR);
    let phrase =
        if unit(rng) < P_COLOUR_AFTER { format!("{shape} in {colour}") } else { format!("{colour} {shape}") };
    let mut body = if unit(rng) < P_ARTICLE { with_article(&phrase) } else { phrase };
    if unit(rng) < P_BACKGROUND {
        let background = choose(rng, scene.background.words(), 0.5);
        body = format!("{body} on a {background}");
    }
    let style = unit(rng);
    if style < P_STYLE_PREFIX {
        // After "a drawing of" the article is not optional in English.
        let prefix = STYLE_PREFIXES[pick(rng, STYLE_PREFIXES.len())];
        let body = if body.starts_with("a ") || body.starts_with("an ") { body } else { with_article(&body) };
        format!("{prefix} {body}")
    } else if style < P_STYLE_PREFIX + P_STYLE_SUFFIX {
        format!("{body}, {}", STYLE_SUFFIXES[pick(rng, STYLE_SUFFIXES.len())])
    } else {
        body
    }
}

/// The canonical prompt, "a red cross", "an orange plus sign": canonical words, no style.
pub fn canonical_prompt(shape: Shape, colour: Colour) -> String {
    with_article(&format!("{} {}", colour.name(), shape.name()))
}

/// One prompt per held-out word of `shape`, in the canonical template: "a red saltire", ...
/// Pre-training saw these words; unlearning data never does.
pub fn held_out_prompts(shape: Shape, colour: Colour) -> Vec<String> {
    shape.held_out_words().iter().map(|word| with_article(&format!("{} {word}", colour.name()))).collect()
}

/// The shape DUO erases by default, and the look-alike it must keep.
pub const DEFAULT_UNSAFE: Shape = Shape::Cross;
pub const DEFAULT_SAFE: Shape = Shape::Plus;

/// An unsafe prompt and its safe twin: the same colour, another shape, canonical wording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptPair {
    pub colour: Colour,
    pub unsafe_shape: Shape,
    pub safe_shape: Shape,
    pub unsafe_prompt: String,
    pub safe_prompt: String,
}

/// The safe twin of "a `colour` `unsafe_shape`": "a `colour` `safe_shape`".
pub fn safe_twin(unsafe_shape: Shape, safe_shape: Shape, colour: Colour) -> Result<PromptPair> {
    if unsafe_shape == safe_shape {
        return Err(DuoError::Invalid(format!(
            "the safe twin of a {unsafe_shape:?} must be another shape, got {safe_shape:?}"
        )));
    }
    Ok(PromptPair {
        colour,
        unsafe_shape,
        safe_shape,
        unsafe_prompt: canonical_prompt(unsafe_shape, colour),
        safe_prompt: canonical_prompt(safe_shape, colour),
    })
}

/// One [`safe_twin`] pair per colour, in [`Colour::ALL`] order.
pub fn prompt_pairs(unsafe_shape: Shape, safe_shape: Shape) -> Result<Vec<PromptPair>> {
    Colour::ALL.iter().map(|&colour| safe_twin(unsafe_shape, safe_shape, colour)).collect()
}

/// What a caption says, read back by word lookup. A field is `None` when the caption names no
/// such thing, or names two different ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParsedCaption {
    pub shape: Option<Shape>,
    pub colour: Option<Colour>,
    pub background: Option<Background>,
}

#[derive(Clone, Copy)]
enum Meaning {
    Shape(Shape),
    Colour(Colour),
    Background(Background),
}

/// Reads the labels back from a caption: lower-cases it, splits it into words, and matches the
/// vocabulary's phrases longest first ("diagonal cross" before "cross", "plus sign" before
/// "plus"). Any other word is ignored.
pub fn parse_caption(text: &str) -> ParsedCaption {
    let mut phrases: Vec<(Vec<&str>, Meaning)> = Vec::new();
    for shape in Shape::ALL {
        for word in shape.shared_words().iter().chain(shape.held_out_words()) {
            phrases.push((word.split(' ').collect(), Meaning::Shape(shape)));
        }
    }
    for colour in Colour::ALL {
        phrases.extend(colour.words().iter().map(|w| (vec![*w], Meaning::Colour(colour))));
    }
    for background in Background::ALL {
        for word in background.words() {
            phrases.push((word.split(' ').collect(), Meaning::Background(background)));
        }
    }
    phrases.sort_by_key(|(words, _)| std::cmp::Reverse(words.len()));

    let lower = text.to_lowercase();
    let words: Vec<&str> =
        lower.split(|c: char| !c.is_alphanumeric() && c != '-').filter(|w| !w.is_empty()).collect();
    let (mut shapes, mut colours, mut backgrounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i < words.len() {
        match phrases.iter().find(|(phrase, _)| words[i..].starts_with(phrase)) {
            Some((phrase, meaning)) => {
                match *meaning {
                    Meaning::Shape(s) => shapes.push(s),
                    Meaning::Colour(c) => colours.push(c),
                    Meaning::Background(b) => backgrounds.push(b),
                }
                i += phrase.len();
            }
            None => i += 1,
        }
    }
    ParsedCaption { shape: agreed(&shapes), colour: agreed(&colours), background: agreed(&backgrounds) }
}

/// The one value all mentions agree on, if any.
fn agreed<T: Copy + PartialEq>(found: &[T]) -> Option<T> {
    let first = *found.first()?;
    found.iter().all(|&v| v == first).then_some(first)
}

/// The first word with probability `p_first`, otherwise one of the others uniformly.
fn choose<'a>(rng: &mut impl RngCore, words: &[&'a str], p_first: f32) -> &'a str {
    if words.len() == 1 || unit(rng) < p_first { words[0] } else { words[1 + pick(rng, words.len() - 1)] }
}

/// Prefixes "a" or "an" by the sound of the first word ("an x mark", "an orange heart").
fn with_article(phrase: &str) -> String {
    let first = phrase.split(' ').next().unwrap_or_default();
    let vowel_sound = first == "x" || first.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if vowel_sound { "an" } else { "a" })
}
