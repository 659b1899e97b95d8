//! Text that came from a tenant (an engine's log lines in a failure's reason), made safe to store
//! and to print on an operator's terminal: control characters (escape sequences that could
//! rewrite the screen, set the window title or fake a prompt) and bidirectional overrides (that
//! reorder what is shown) are written as visible escapes.

/// `text` with every control character and bidirectional formatting character escaped as
/// `\xNN` or `\u{NNNN}`. Backslashes stay as they are, so escaping twice (the agent, then the
/// scheduler, then the terminal output) changes nothing more: text that merely looks like an
/// escape is harmless.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if u32::from(c) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `text` is free of what `escape_control` escapes.
pub fn is_printable(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() || is_bidi_control(c))
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_become_visible_text() {
        let evil = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31mFATAL\r\n\u{9b}1m\u{202e}gnp.exe";
        let safe = escape_control(evil);
        assert!(is_printable(&safe), "{safe}");
        assert_eq!(
            safe,
            "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31mFATAL\\x0d\\x0a\\u{009b}1m\\u{202e}gnp.exe"
        );
    }

    #[test]
    fn plain_text_and_non_ascii_letters_stay() {
        assert_eq!(escape_control("données: prête | ok"), "données: prête | ok");
        assert_eq!(escape_control("a\\x1b"), "a\\x1b");
        let once = escape_control("\u{1b}[2J");
        assert_eq!(escape_control(&once), once);
    }
}
