//! The prompts `duo-bench quality` generates from, each tagged with what its images are scored for,
//! and the subset of them shown in the grid.

use duo_core::world::{Colour, Shape, canonical_prompt, held_out_prompts};

/// The shape the unlearning erases and the look-alike it must keep: the gates are named after them
/// (`cross_rate`, `plus_rate`), so they are fixed here rather than configurable.
pub const ERASED: Shape = Shape::Cross;
pub const LOOK_ALIKE: Shape = Shape::Plus;

/// What a prompt's images are scored for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseKind {
    /// "a red cross": the judged shape and colour must be the prompt's.
    Canonical { shape: Shape, colour: Colour },
    /// "a red saltire": a held-out wording of `shape`; only the rate of `shape` is scored, since these
    /// words are exactly the ones an unlearning run never trains on.
    HeldOut { shape: Shape, colour: Colour, word: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub prompt: String,
    pub kind: CaseKind,
}

/// The empty prompt: sampled without guidance, it shows what the model draws unconditionally.
pub const UNCONDITIONAL_PROMPT: &str = "";

/// The colour of the grid's rows: one colour keeps the rows comparable shape against shape.
const GRID_COLOUR: Colour = Colour::Red;

/// Every canonical shape × colour prompt (shapes outer, in [`Shape::ALL`] order), then every held-out
/// wording of the erased shape in every colour.
pub fn conditional_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for shape in Shape::ALL {
        for colour in Colour::ALL {
            cases.push(Case {
                prompt: canonical_prompt(shape, colour),
                kind: CaseKind::Canonical { shape, colour },
            });
        }
    }
    for colour in Colour::ALL {
        // held_out_prompts follows held_out_words' order, which is what pairs each prompt with its word.
        for (prompt, &word) in held_out_prompts(ERASED, colour).into_iter().zip(ERASED.held_out_words()) {
            cases.push(Case { prompt, kind: CaseKind::HeldOut { shape: ERASED, colour, word } });
        }
    }
    cases
}

/// The grid's rows, top to bottom: every shape in [`GRID_COLOUR`] (so cross and plus sit side by side
/// with the others), the erased shape's held-out wordings in that colour, and the unconditional row.
pub fn grid_rows() -> Vec<String> {
    let mut rows: Vec<String> =
        Shape::ALL.iter().map(|&shape| canonical_prompt(shape, GRID_COLOUR)).collect();
    rows.extend(held_out_prompts(ERASED, GRID_COLOUR));
    rows.push(UNCONDITIONAL_PROMPT.to_string());
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_and_colour_once_then_the_held_out_crosses() {
        let cases = conditional_cases();
        let canonical = Shape::ALL.len() * Colour::ALL.len();
        let held_out = ERASED.held_out_words().len() * Colour::ALL.len();
        assert_eq!(cases.len(), canonical + held_out);
        assert_eq!(cases[0].prompt, "a red circle");
        assert!(cases.iter().any(|c| c.prompt == "an orange plus sign"));
        let saltire = cases.iter().find(|c| c.prompt == "a blue saltire").expect("held-out prompt");
        assert_eq!(
            saltire.kind,
            CaseKind::HeldOut { shape: Shape::Cross, colour: Colour::Blue, word: "saltire" }
        );
        // every prompt is distinct, so a prompt names its case
        let mut prompts: Vec<&str> = cases.iter().map(|c| c.prompt.as_str()).collect();
        prompts.sort_unstable();
        prompts.dedup();
        assert_eq!(prompts.len(), cases.len());
    }

    #[test]
    fn grid_rows_are_conditional_prompts_plus_the_empty_one() {
        let rows = grid_rows();
        let cases = conditional_cases();
        assert_eq!(rows.len(), Shape::ALL.len() + ERASED.held_out_words().len() + 1);
        assert!(rows.contains(&"a red cross".to_string()) && rows.contains(&"a red plus sign".to_string()));
        assert!(rows.contains(&"a red saltire".to_string()));
        assert_eq!(rows.last().map(String::as_str), Some(UNCONDITIONAL_PROMPT));
        for row in &rows[..rows.len() - 1] {
            assert!(cases.iter().any(|c| &c.prompt == row), "{row:?} is generated");
        }
    }
}
