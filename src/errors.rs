//! Errors as people read them.

/// An error with its causes, on one line: what `herald` prints when a command fails, what
/// `herald check` reports, and what a Web Push attempt logs.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        // Some errors print their cause in their own message already.
        let said = inner.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}
