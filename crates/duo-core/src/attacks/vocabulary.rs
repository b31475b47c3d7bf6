//! The tokens a discrete prompt search may use.

use crate::tokenizer::ClipTokenizer;
use crate::{DuoError, Result};

/// Every token of the vocabulary but the special ones and those that spell a banned word (with or
/// without the end-of-word mark), so a search cannot simply ask for the concept by name.
pub struct Vocabulary {
    pub allowed: Vec<u32>,
}

impl Vocabulary {
    pub fn new(tokenizer: &ClipTokenizer, banned_words: &[String]) -> Result<Self> {
        let special = [tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()];
        let banned: Vec<String> =
            banned_words.iter().map(|w| w.to_lowercase()).filter(|w| !w.is_empty()).collect();
        let allowed: Vec<u32> = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| {
                let Some(text) = tokenizer.id_to_token(id) else { return false };
                let text = text.trim_end_matches("</w>").to_lowercase();
                !special.contains(&id) && !banned.contains(&text)
            })
            .collect();
        if allowed.is_empty() {
            return Err(DuoError::Invalid("the banned words leave no token to search over".into()));
        }
        Ok(Self { allowed })
    }
}
