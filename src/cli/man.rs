//! Documents generated from the clap definitions: shell completion scripts and the manual page
//! (one page with every subcommand's options, the environment variables and the exit codes).

use clap::CommandFactory;
use roff::{Roff, bold, italic, roman};

use super::{Args, ENVIRONMENT, EXIT_CODES, NAME};

/// The name clap_complete's bash script is generated under: its bash generator mangles a
/// hyphen in the command's name one way for the words it has seen and another for its cases,
/// so that nothing completes past the subcommand (`onnx-repvgg fuse --<TAB>`). Generated under a
/// name without one, its functions agree; the script then registers them for [`NAME`].
const BASH_NAME: &str = "onnx_repvgg";

/// The completion script for `shell`.
pub(crate) fn completions(shell: clap_complete::Shell) -> String {
    let mut bytes = Vec::new();
    if shell != clap_complete::Shell::Bash {
        clap_complete::generate(shell, &mut Args::command(), NAME, &mut bytes);
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    let mut command = Args::command().name(BASH_NAME);
    clap_complete::generate(shell, &mut command, BASH_NAME, &mut bytes);
    let script = String::from_utf8_lossy(&bytes);
    // Only the registrations name the command people type.
    let suffix = format!(" {BASH_NAME}");
    script
        .lines()
        .map(|line| match line.trim_start().starts_with("complete ") {
            true => match line.strip_suffix(&suffix) {
                Some(start) => format!("{start} {NAME}\n"),
                None => format!("{line}\n"),
            },
            false => format!("{line}\n"),
        })
        .collect()
}

/// The manual page, in roff.
pub(crate) fn page() -> String {
    let mut top = Args::command();
    top.build();
    let version = top.get_version().unwrap_or_default().to_string();
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [NAME, "1", "", &format!("{NAME} {version}"), "User Commands"],
    );
    roff.control("SH", ["NAME"]);
    let about = top.get_about().map(|a| a.to_string()).unwrap_or_default();
    roff.text([roman(format!("{NAME} - {about}"))]);
    roff.control("SH", ["SYNOPSIS"]);
    for sub in commands(&top) {
        roff.text([
            bold(format!("{NAME} {}", sub.get_name())),
            roman(format!(" {}", operands(sub))),
        ]);
        roff.control("br", []);
    }
    roff.control("SH", ["DESCRIPTION"]);
    paragraphs(
        &mut roff,
        &top.get_long_about().map(|a| a.to_string()).unwrap_or(about),
    );
    roff.text([
        roman("Every subcommand takes "),
        bold("-h"),
        roman(" / "),
        bold("--help"),
        roman(", and the program "),
        bold("-V"),
        roman(" / "),
        bold("--version"),
        roman("."),
    ]);
    roff.control("SH", ["COMMANDS"]);
    for sub in commands(&top) {
        roff.control(
            "SS",
            [format!("{NAME} {} {}", sub.get_name(), operands(sub)).as_str()],
        );
        let text = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        paragraphs(&mut roff, &text);
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            if matches!(arg.get_id().as_str(), "help") {
                continue;
            }
            roff.control("TP", []);
            roff.text(arg_names(arg));
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_string())
                .collect();
            let mut help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            if !values.is_empty() {
                help += &format!(" One of: {}.", values.join(", "));
            }
            roff.text([roman(help)]);
        }
        if let Some(examples) = sub.get_after_help() {
            roff.control("PP", []);
            let text = examples.to_string();
            let mut lines = text.lines();
            // Examples as typed: one per line, not filled.
            roff.control("nf", []);
            for line in lines.by_ref() {
                if line.trim().is_empty() {
                    break;
                }
                match line.strip_prefix("  ") {
                    Some(example) => roff.text([roman(format!("    {example}"))]),
                    None => roff.text([italic(line.to_string())]),
                };
            }
            roff.control("fi", []);
            let rest: Vec<&str> = lines.collect();
            if !rest.is_empty() {
                roff.control("PP", []);
                paragraphs(&mut roff, &rest.join("\n"));
            }
        }
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, what) in ENVIRONMENT {
        roff.control("TP", []);
        roff.text([bold(*name)]);
        roff.text([roman(what.split_whitespace().collect::<Vec<_>>().join(" "))]);
    }
    roff.control("SH", ["EXIT STATUS"]);
    for (code, what) in EXIT_CODES {
        roff.control("TP", []);
        roff.text([bold(*code)]);
        roff.text([roman(what.split_whitespace().collect::<Vec<_>>().join(" "))]);
    }
    roff.text([
        roman("Results go to standard output; errors (one line, starting with "),
        bold(format!("{NAME}:")),
        roman(") and warnings to standard error."),
    ]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("dot"),
        roman("(1), "),
        bold("bash"),
        roman("(1): "),
        bold(format!("{NAME} completions bash")),
        roman("."),
    ]);
    let mut bytes = Vec::new();
    let _ = roff.to_writer(&mut bytes);
    ascii(&String::from_utf8_lossy(&bytes))
}

/// The page in ASCII: every other character (→, σ, —) as the groff escape `\[uXXXX]`, which
/// groff and mandoc read whatever the locale.
fn ascii(page: &str) -> String {
    page.chars()
        .map(|c| match c.is_ascii() {
            true => c.to_string(),
            false => format!("\\[u{:04X}]", c as u32),
        })
        .collect()
}

/// The subcommands people use (not clap's `help`).
fn commands(top: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    top.get_subcommands().filter(|s| s.get_name() != "help")
}

/// `[OPTIONS] <IN OUT | IN...>...`: what follows the subcommand's name.
fn operands(sub: &clap::Command) -> String {
    let mut words = Vec::new();
    if sub
        .get_arguments()
        .any(|a| !a.is_positional() && !a.is_hide_set() && a.get_id() != "help")
    {
        words.push("[OPTIONS]".to_string());
    }
    for arg in sub.get_positionals() {
        let name = value_name(arg);
        let many = arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        let word = match arg.is_required_set() {
            true => format!("<{name}>"),
            false => format!("[{name}]"),
        };
        words.push(if many { word + "..." } else { word });
    }
    words.join(" ")
}

fn value_name(arg: &clap::Arg) -> String {
    arg.get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase())
}

/// `-o, --output <FILE>` (bold names, italic value), or `<IN>` for an operand.
fn arg_names(arg: &clap::Arg) -> Vec<roff::Inline> {
    if arg.is_positional() {
        return vec![italic(format!("<{}>", value_name(arg)))];
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(bold(format!("-{short}")));
    }
    if let Some(long) = arg.get_long() {
        if !names.is_empty() {
            names.push(roman(", "));
        }
        names.push(bold(format!("--{long}")));
    }
    if arg.get_action().takes_values() {
        names.push(roman(" "));
        names.push(italic(format!("<{}>", value_name(arg))));
    }
    names
}

/// Text paragraphs (blank-line separated), each one filled by the formatter.
fn paragraphs(roff: &mut Roff, text: &str) {
    for (i, paragraph) in text.split("\n\n").enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        roff.text([roman(
            paragraph.split_whitespace().collect::<Vec<_>>().join(" "),
        )]);
    }
}
