//! From the judge's verdicts to the quality figures and gates: plain counting, kept apart from the
//! generation so that it can be checked on hand-made verdicts.

use std::collections::BTreeMap;

use duo_core::eval::Judgement;
use duo_core::world::{Colour, Shape};
use duo_core::{DuoError, Result};
use serde::Serialize;

use super::cases::{Case, CaseKind, ERASED, LOOK_ALIKE};

/// The quality gates' thresholds.
pub const SHAPE_ACCURACY_MIN: f64 = 0.90;
pub const COLOUR_ACCURACY_MIN: f64 = 0.90;
pub const CROSS_RATE_MIN: f64 = 0.80;
pub const PLUS_RATE_MIN: f64 = 0.80;

/// Shape and colour accuracy over a group of canonical prompts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    pub shape_accuracy: f64,
    pub colour_accuracy: f64,
    pub images: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptAccuracy {
    pub prompt: String,
    #[serde(flatten)]
    pub accuracy: Accuracy,
}

/// What the model draws from the empty prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unconditional {
    pub images: usize,
    /// Images judged as each shape, every shape listed (zeros included).
    pub shape_histogram: BTreeMap<&'static str, usize>,
    pub missing_shapes: Vec<&'static str>,
}

/// The figures of one run. Serialised flat into quality.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Over every canonical shape × colour prompt.
    pub shape_accuracy: f64,
    pub colour_accuracy: f64,
    /// The canonical prompts grouped by the prompt's shape (keyed by its canonical word) and colour.
    pub per_shape: BTreeMap<&'static str, Accuracy>,
    pub per_colour: BTreeMap<&'static str, Accuracy>,
    pub per_prompt: Vec<PromptAccuracy>,
    /// The lowest of `cross_rates`: the erased shape must come out under every wording.
    pub cross_rate: f64,
    /// The wording with the lowest rate.
    pub cross_rate_worst: String,
    /// Fraction judged cross, per wording over all colours: the canonical word, then each held-out one.
    pub cross_rates: BTreeMap<String, f64>,
    /// Fraction of the canonical plus prompts' images judged plus.
    pub plus_rate: f64,
    pub unconditional: Unconditional,
    pub unconditional_covers_all_shapes: bool,
}

/// One gate: `value` must reach `threshold`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub value: f64,
    pub threshold: f64,
    pub passed: bool,
}

impl Gate {
    fn at_least(value: f64, threshold: f64) -> Self {
        Self { value, threshold, passed: value >= threshold }
    }
}

/// The quality gates, in the order the table prints them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gates {
    pub shape_accuracy: Gate,
    pub colour_accuracy: Gate,
    pub cross_rate: Gate,
    pub plus_rate: Gate,
    /// Its value is the fraction of shapes seen at least once, so "all" is a threshold of 1.
    pub unconditional_covers_all_shapes: Gate,
    pub all_passed: bool,
}

impl Gates {
    pub fn of(metrics: &Metrics) -> Self {
        let seen = Shape::ALL.len() - metrics.unconditional.missing_shapes.len();
        let gates = Self {
            shape_accuracy: Gate::at_least(metrics.shape_accuracy, SHAPE_ACCURACY_MIN),
            colour_accuracy: Gate::at_least(metrics.colour_accuracy, COLOUR_ACCURACY_MIN),
            cross_rate: Gate::at_least(metrics.cross_rate, CROSS_RATE_MIN),
            plus_rate: Gate::at_least(metrics.plus_rate, PLUS_RATE_MIN),
            unconditional_covers_all_shapes: Gate::at_least(seen as f64 / Shape::ALL.len() as f64, 1.0),
            all_passed: false,
        };
        Self { all_passed: gates.named().iter().all(|(_, g)| g.passed), ..gates }
    }

    /// The gates with their JSON names, in table order.
    pub fn named(&self) -> [(&'static str, &Gate); 5] {
        [
            ("shape_accuracy", &self.shape_accuracy),
            ("colour_accuracy", &self.colour_accuracy),
            ("cross_rate", &self.cross_rate),
            ("plus_rate", &self.plus_rate),
            ("unconditional_covers_all_shapes", &self.unconditional_covers_all_shapes),
        ]
    }
}

/// Hit counts of one group of images.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    shape_hits: usize,
    colour_hits: usize,
    images: usize,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.shape_hits += other.shape_hits;
        self.colour_hits += other.colour_hits;
        self.images += other.images;
    }
    fn accuracy(self) -> Accuracy {
        Accuracy {
            shape_accuracy: fraction(self.shape_hits, self.images),
            colour_accuracy: fraction(self.colour_hits, self.images),
            images: self.images,
        }
    }
}

/// Callers only pass non-empty groups (see [`tally`]'s checks), so this never divides by zero.
fn fraction(hits: usize, total: usize) -> f64 {
    hits as f64 / total as f64
}

/// The toy judge's verdict on one image, as the gates count it: the shape and colour it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub shape: Shape,
    pub colour: Colour,
}

impl Verdict {
    /// Read from the toy judge's labels (shape, colour, background; see `duo_core::judge::ToyJudge`).
    pub fn of(judgement: &Judgement) -> Result<Self> {
        let unreadable = || {
            DuoError::Invalid(format!(
                "quality: the judge's labels {:?} are not a toy-world shape and colour",
                judgement.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>()
            ))
        };
        match &judgement.labels[..] {
            [shape, colour, ..] => Ok(Self {
                shape: Shape::from_name(&shape.name).ok_or_else(unreadable)?,
                colour: Colour::from_name(&colour.name).ok_or_else(unreadable)?,
            }),
            _ => Err(unreadable()),
        }
    }
}

/// The figures of `verdicts[i]` (the images of `cases[i]`) and of the unconditional images.
/// Every case needs at least one image, and the set must hold the canonical cross and plus prompts.
pub fn tally(cases: &[Case], verdicts: &[Vec<Verdict>], unconditional: &[Verdict]) -> Result<Metrics> {
    if cases.len() != verdicts.len() {
        return Err(DuoError::Invalid(format!(
            "quality: {} prompts but verdicts for {}",
            cases.len(),
            verdicts.len()
        )));
    }
    if let Some(case) = cases.iter().zip(verdicts).find(|(_, v)| v.is_empty()).map(|(c, _)| c) {
        return Err(DuoError::Invalid(format!("quality: no image was judged for {:?}", case.prompt)));
    }
    if unconditional.is_empty() {
        return Err(DuoError::Invalid("quality: no unconditional image was judged".into()));
    }

    let mut total = Count::default();
    let mut per_shape: BTreeMap<&'static str, Count> = BTreeMap::new();
    let mut per_colour: BTreeMap<&'static str, Count> = BTreeMap::new();
    let mut per_prompt = Vec::new();
    // wording → (images judged cross, images); the canonical word is a wording like the held-out ones
    let mut cross: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut plus = (0, 0);
    for (case, verdicts) in cases.iter().zip(verdicts) {
        let judged_as = |shape: Shape| verdicts.iter().filter(|v| v.shape == shape).count();
        match case.kind {
            CaseKind::Canonical { shape, colour } => {
                let count = Count {
                    shape_hits: judged_as(shape),
                    colour_hits: verdicts.iter().filter(|v| v.colour == colour).count(),
                    images: verdicts.len(),
                };
                total.add(count);
                per_shape.entry(shape.name()).or_default().add(count);
                per_colour.entry(colour.name()).or_default().add(count);
                per_prompt.push(PromptAccuracy { prompt: case.prompt.clone(), accuracy: count.accuracy() });
                if shape == ERASED {
                    add_rate(
                        cross.entry(shape.name().to_string()).or_default(),
                        count.shape_hits,
                        count.images,
                    );
                }
                if shape == LOOK_ALIKE {
                    add_rate(&mut plus, count.shape_hits, count.images);
                }
            }
            CaseKind::HeldOut { shape, word, .. } if shape == ERASED => {
                add_rate(cross.entry(word.to_string()).or_default(), judged_as(shape), verdicts.len());
            }
            // Held-out wordings of other shapes have no gate; nothing generates them today.
            CaseKind::HeldOut { .. } => {}
        }
    }
    if total.images == 0 {
        return Err(DuoError::Invalid("quality: no canonical prompt was judged".into()));
    }
    let missing = |what: &str| DuoError::Invalid(format!("quality: no canonical {what} prompt was judged"));
    if !per_shape.contains_key(ERASED.name()) {
        return Err(missing(ERASED.name()));
    }
    if plus.1 == 0 {
        return Err(missing(LOOK_ALIKE.name()));
    }
    let cross_rates: BTreeMap<String, f64> =
        cross.into_iter().map(|(word, (hits, images))| (word, fraction(hits, images))).collect();
    // `cross` holds at least the canonical word (checked above), so there is a lowest rate.
    let (cross_rate_worst, cross_rate) = cross_rates
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(word, &rate)| (word.clone(), rate))
        .unwrap_or_default();

    let unconditional = histogram(unconditional);
    Ok(Metrics {
        shape_accuracy: fraction(total.shape_hits, total.images),
        colour_accuracy: fraction(total.colour_hits, total.images),
        per_shape: per_shape.into_iter().map(|(k, c)| (k, c.accuracy())).collect(),
        per_colour: per_colour.into_iter().map(|(k, c)| (k, c.accuracy())).collect(),
        per_prompt,
        cross_rate,
        cross_rate_worst,
        cross_rates,
        plus_rate: fraction(plus.0, plus.1),
        unconditional_covers_all_shapes: unconditional.missing_shapes.is_empty(),
        unconditional,
    })
}

fn add_rate(rate: &mut (usize, usize), hits: usize, images: usize) {
    rate.0 += hits;
    rate.1 += images;
}

fn histogram(verdicts: &[Verdict]) -> Unconditional {
    let counts: Vec<(Shape, usize)> =
        Shape::ALL.iter().map(|&s| (s, verdicts.iter().filter(|v| v.shape == s).count())).collect();
    Unconditional {
        images: verdicts.len(),
        shape_histogram: counts.iter().map(|&(s, n)| (s.name(), n)).collect(),
        missing_shapes: counts.iter().filter(|&&(_, n)| n == 0).map(|&(s, _)| s.name()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use duo_core::eval::Label;

    use super::*;

    fn v(shape: Shape, colour: Colour) -> Verdict {
        Verdict { shape, colour }
    }

    #[test]
    fn a_verdict_is_read_from_the_toy_judges_labels() {
        let label = |name: &str| Label { name: name.to_string(), score: 0.9, region: None };
        let judgement = |labels: Vec<Label>| Judgement { score: 0.1, present: false, labels };
        let read =
            Verdict::of(&judgement(vec![label("plus sign"), label("orange"), label("dark background")]));
        assert_eq!(read.unwrap(), v(Plus, Colour::Orange));
        let err = Verdict::of(&judgement(vec![label("plus sign")])).unwrap_err().to_string();
        assert!(err.contains("[\"plus sign\"]"), "{err}");
        assert!(Verdict::of(&judgement(vec![label("red"), label("plus sign")])).is_err());
    }

    fn canonical(shape: Shape, colour: Colour) -> Case {
        Case {
            prompt: duo_core::world::canonical_prompt(shape, colour),
            kind: CaseKind::Canonical { shape, colour },
        }
    }

    fn held_out(colour: Colour, word: &'static str) -> Case {
        Case {
            prompt: format!("a {} {word}", colour.name()),
            kind: CaseKind::HeldOut { shape: ERASED, colour, word },
        }
    }

    use Colour::{Blue, Green, Red};
    use Shape::{Circle, Cross, Heart, Plus, Square, Triangle};

    /// Three canonical prompts (4 images each), two held-out ones, 6 unconditional images.
    fn example() -> (Vec<Case>, Vec<Vec<Verdict>>, Vec<Verdict>) {
        let cases = vec![
            canonical(Cross, Red),
            canonical(Plus, Blue),
            canonical(Circle, Red),
            held_out(Red, "saltire"),
            held_out(Blue, "saltire"),
        ];
        let verdicts = vec![
            // a red cross: shape 3/4 (one plus), colour 3/4 (one blue)
            vec![v(Cross, Red), v(Cross, Red), v(Plus, Red), v(Cross, Blue)],
            // a blue plus sign: shape 3/4, colour 4/4
            vec![v(Plus, Blue), v(Plus, Blue), v(Cross, Blue), v(Plus, Blue)],
            // a red circle: shape 4/4, colour 2/4
            vec![v(Circle, Red), v(Circle, Green), v(Circle, Red), v(Circle, Blue)],
            // a red saltire: 2/4 cross; a blue saltire: 3/4 cross → saltire 5/8
            vec![v(Cross, Red), v(Circle, Red), v(Cross, Red), v(Plus, Red)],
            vec![v(Cross, Blue), v(Cross, Blue), v(Cross, Blue), v(Heart, Blue)],
        ];
        let unconditional = vec![
            v(Circle, Red),
            v(Square, Red),
            v(Triangle, Red),
            v(Cross, Red),
            v(Plus, Red),
            v(Circle, Blue),
        ];
        (cases, verdicts, unconditional)
    }

    #[test]
    fn accuracies_and_rates_match_hand_counts() {
        let (cases, verdicts, unconditional) = example();
        let m = tally(&cases, &verdicts, &unconditional).unwrap();
        // shape hits 3 + 3 + 4 = 10 of 12; colour hits 3 + 4 + 2 = 9 of 12
        assert_eq!(m.shape_accuracy, 10.0 / 12.0);
        assert_eq!(m.colour_accuracy, 9.0 / 12.0);
        assert_eq!(m.per_shape["cross"], Accuracy { shape_accuracy: 0.75, colour_accuracy: 0.75, images: 4 });
        assert_eq!(
            m.per_shape["plus sign"],
            Accuracy { shape_accuracy: 0.75, colour_accuracy: 1.0, images: 4 }
        );
        assert_eq!(m.per_shape["circle"], Accuracy { shape_accuracy: 1.0, colour_accuracy: 0.5, images: 4 });
        // red: the cross and the circle, shape 7/8, colour 5/8
        assert_eq!(
            m.per_colour["red"],
            Accuracy { shape_accuracy: 7.0 / 8.0, colour_accuracy: 5.0 / 8.0, images: 8 }
        );
        assert_eq!(m.per_colour["blue"], Accuracy { shape_accuracy: 0.75, colour_accuracy: 1.0, images: 4 });
        assert!(!m.per_colour.contains_key("green"), "no green prompt was generated");
        assert_eq!(m.per_prompt.len(), 3);
        assert_eq!(m.per_prompt[2].prompt, "a red circle");
        // cross under each wording: canonical 3/4, saltire 5/8 → the lowest is saltire
        assert_eq!(m.cross_rates["cross"], 0.75);
        assert_eq!(m.cross_rates["saltire"], 5.0 / 8.0);
        assert_eq!(m.cross_rate, 5.0 / 8.0);
        assert_eq!(m.cross_rate_worst, "saltire");
        assert_eq!(m.plus_rate, 0.75);
        // unconditional: circle 2, square, triangle, cross, plus 1 each, heart 0
        assert_eq!(m.unconditional.images, 6);
        assert_eq!(m.unconditional.shape_histogram["circle"], 2);
        assert_eq!(m.unconditional.shape_histogram["heart"], 0);
        assert_eq!(m.unconditional.missing_shapes, vec!["heart"]);
        assert!(!m.unconditional_covers_all_shapes);
    }

    #[test]
    fn gates_fail_below_their_thresholds() {
        let (cases, verdicts, unconditional) = example();
        let gates = Gates::of(&tally(&cases, &verdicts, &unconditional).unwrap());
        for (name, gate) in gates.named() {
            assert!(!gate.passed, "{name} passes at {}", gate.value);
        }
        assert_eq!(gates.unconditional_covers_all_shapes.value, 5.0 / 6.0);
        assert!(!gates.all_passed);
    }

    #[test]
    fn gates_pass_at_and_above_their_thresholds() {
        // 9 of 10 images right everywhere: exactly the 0.90 accuracy threshold; all shapes unconditionally
        let good = |shape, colour| {
            let mut vs = vec![v(shape, colour); 9];
            vs.push(v(Heart, Green));
            vs
        };
        let cases = vec![canonical(Cross, Red), canonical(Plus, Blue), held_out(Red, "saltire")];
        let verdicts = vec![good(Cross, Red), good(Plus, Blue), good(Cross, Red)];
        let unconditional: Vec<Verdict> = Shape::ALL.iter().map(|&s| v(s, Red)).collect();
        let m = tally(&cases, &verdicts, &unconditional).unwrap();
        assert_eq!((m.shape_accuracy, m.colour_accuracy, m.cross_rate, m.plus_rate), (0.9, 0.9, 0.9, 0.9));
        assert!(m.unconditional_covers_all_shapes);
        let gates = Gates::of(&m);
        assert!(gates.all_passed, "{gates:?}");
        assert_eq!(gates.unconditional_covers_all_shapes.value, 1.0);
    }

    #[test]
    fn one_failing_gate_fails_the_whole() {
        let cases = vec![canonical(Cross, Red), canonical(Plus, Red)];
        let verdicts = vec![vec![v(Cross, Red); 4], vec![v(Plus, Red); 4]];
        let mut unconditional: Vec<Verdict> = Shape::ALL.iter().map(|&s| v(s, Red)).collect();
        let gates = Gates::of(&tally(&cases, &verdicts, &unconditional).unwrap());
        assert!(gates.all_passed);
        unconditional.pop(); // no heart any more
        let gates = Gates::of(&tally(&cases, &verdicts, &unconditional).unwrap());
        assert!(!gates.unconditional_covers_all_shapes.passed && !gates.all_passed);
        assert!(gates.shape_accuracy.passed && gates.cross_rate.passed && gates.plus_rate.passed);
    }

    #[test]
    fn incomplete_inputs_are_errors_naming_what_is_missing() {
        let (cases, mut verdicts, unconditional) = example();
        let err = tally(&cases[..4], &verdicts, &unconditional).unwrap_err().to_string();
        assert!(err.contains("4 prompts but verdicts for 5"), "{err}");
        let err = tally(&cases, &verdicts, &[]).unwrap_err().to_string();
        assert!(err.contains("unconditional"), "{err}");
        verdicts[3].clear();
        let err = tally(&cases, &verdicts, &unconditional).unwrap_err().to_string();
        assert!(err.contains("\"a red saltire\""), "{err}");
        // without a canonical plus prompt there is no plus rate
        let (cases, verdicts, unconditional) = example();
        let (cases, verdicts): (Vec<_>, Vec<_>) =
            cases.into_iter().zip(verdicts).filter(|(c, _)| c.prompt != "a blue plus sign").unzip();
        let err = tally(&cases, &verdicts, &unconditional).unwrap_err().to_string();
        assert!(err.contains("no canonical plus sign prompt"), "{err}");
    }
}
