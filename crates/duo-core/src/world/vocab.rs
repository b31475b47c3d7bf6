//! The world's closed vocabulary: shapes, colours and backgrounds, with the words captions use.
//!
//! Every word list puts the canonical word first. Shape words come in two lists: `shared` words
//! may appear in any caption; `held_out` words appear in pre-training captions only, so that the
//! base model knows them but the unlearning data never uses them (they are the "held-out
//! paraphrases" an evaluation attacks with). No word or phrase is shared between two meanings,
//! which is what lets [`super::parse_caption`] read a caption back by plain lookup.

use serde::{Deserialize, Serialize};

/// The object's silhouette. `Cross` is the diagonal ✕ and `Plus` the upright +: the same figure
/// rotated by 45°, so they are the world's look-alike pair. The word "cross" means only ✕ here;
/// no word for + contains "cross".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    /// ✕, the diagonal cross.
    Cross,
    /// +, the upright cross, called "plus" to keep "cross" unambiguous.
    Plus,
    Heart,
}

/// The object's flat fill colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

/// What lies behind the object: two plain fills and two soft textures, all neutral grey so that
/// they never tint the object or hide its outline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Background {
    /// Plain light grey.
    Light,
    /// Plain near-black.
    Dark,
    /// Vertical grey ramp, light at the top.
    Gradient,
    /// 4×4 checkerboard of two close greys.
    Checker,
}

impl Shape {
    pub const ALL: [Shape; 6] =
        [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross, Shape::Plus, Shape::Heart];

    /// Position in [`Shape::ALL`]: a class index for a judge's shape head.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The shape whose canonical word ([`Shape::name`]) is `name`.
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|shape| shape.name() == name)
    }

    /// [`Shape::from_name`], or an error listing the names: `"star": not a toy-world shape (one of …)`.
    pub fn parse(name: &str) -> std::result::Result<Shape, String> {
        Shape::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
            format!("{name:?}: not a toy-world shape (one of {})", names.join(", "))
        })
    }

    /// The canonical word, used by [`super::canonical_prompt`].
    pub fn name(self) -> &'static str {
        self.shared_words()[0]
    }

    /// Words any caption may use, canonical first.
    pub fn shared_words(self) -> &'static [&'static str] {
        match self {
            Shape::Circle => &["circle", "disc", "dot"],
            Shape::Square => &["square", "box", "block"],
            Shape::Triangle => &["triangle", "delta"],
            Shape::Cross => &["cross", "x mark", "x"],
            Shape::Plus => &["plus sign", "plus", "plus symbol"],
            Shape::Heart => &["heart", "love heart"],
        }
    }

    /// Words reserved for evaluation: in pre-training captions, never in unlearning captions.
    pub fn held_out_words(self) -> &'static [&'static str] {
        match self {
            Shape::Circle => &["round shape"],
            Shape::Square => &["tile"],
            Shape::Triangle => &["pyramid"],
            Shape::Cross => &["saltire", "diagonal cross", "x shape"],
            Shape::Plus => &["addition sign"],
            Shape::Heart => &["valentine"],
        }
    }
}

impl Colour {
    pub const ALL: [Colour; 6] =
        [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange];

    /// Position in [`Colour::ALL`]: a class index for a judge's colour head.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The canonical word, used by [`super::canonical_prompt`].
    pub fn name(self) -> &'static str {
        self.words()[0]
    }

    /// The colour whose canonical word ([`Colour::name`]) is `name`.
    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|colour| colour.name() == name)
    }

    /// Words for this colour, canonical first. All of them may appear in any caption.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Colour::Red => &["red", "crimson", "scarlet"],
            Colour::Green => &["green", "emerald"],
            Colour::Blue => &["blue", "cobalt"],
            Colour::Yellow => &["yellow", "lemon"],
            Colour::Purple => &["purple", "violet"],
            Colour::Orange => &["orange", "tangerine"],
        }
    }

    /// Fill colour as [0, 1] RGB, written to the image as is (no gamma). Saturated and far apart (the closest pair, red and
    /// orange, still differ by 0.4 in green) so colour stays readable after blur and noise.
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Colour::Red => [0.86, 0.10, 0.10],
            Colour::Green => [0.12, 0.66, 0.18],
            Colour::Blue => [0.14, 0.30, 0.92],
            Colour::Yellow => [0.97, 0.86, 0.08],
            Colour::Purple => [0.60, 0.18, 0.78],
            Colour::Orange => [0.99, 0.50, 0.05],
        }
    }
}

impl Background {
    pub const ALL: [Background; 4] =
        [Background::Light, Background::Dark, Background::Gradient, Background::Checker];

    /// Position in [`Background::ALL`]: a class index for a judge's background head.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The canonical phrase ("dark background").
    pub fn name(self) -> &'static str {
        self.words()[0]
    }

    /// Phrases a caption may end with ("... on a dark background"), canonical first.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Background::Light => &["light background", "pale background"],
            Background::Dark => &["dark background", "black background"],
            Background::Gradient => &["gradient background", "shaded background"],
            Background::Checker => &["checkered background", "checkerboard background"],
        }
    }
}
