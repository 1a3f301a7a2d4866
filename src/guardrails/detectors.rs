//! The built-in detectors: one RE2 pattern each (or a few, for `secret`), a validator that turns
//! a pattern match into a finding (Luhn, mod-97, octet ranges, ...), and the placeholder. The
//! longest text a match can span (what a stream holds back) is read from the pattern itself.

use crate::api::Builtin;

/// Whether the match `text[start..end]` is a finding (the text around it may decide).
pub type Validator = fn(text: &str, start: usize, end: usize) -> bool;

/// One pattern of a built-in detector.
pub struct Pattern {
    pub regex: &'static str,
    pub validate: Validator,
}

fn any(_: &str, _: usize, _: usize) -> bool {
    true
}

/// ASCII word boundaries: the lazy DFA runs them on any text (a Unicode `\b` forces the slower
/// engine on non-ASCII input), and every built-in pattern is ASCII.
macro_rules! b {
    () => {
        r"(?-u:\b)"
    };
}

pub fn patterns(builtin: Builtin) -> &'static [Pattern] {
    match builtin {
        Builtin::Email => &[Pattern {
            regex: concat!(
                r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?",
                r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?){0,6}\.[A-Za-z]{2,24}",
                b!()
            ),
            validate: any,
        }],
        Builtin::Phone => &[
            // E.164 and international numbers: + country code, 8 to 15 digits in all.
            Pattern {
                regex: concat!(r"\+[1-9][0-9]{0,3}(?:[ .-]?\(?[0-9]{1,5}\)?){1,6}", b!()),
                validate: |t, s, e| (8..=15).contains(&digits(&t[s..e])),
            },
            // North American: (555) 123-4567, 555-123-4567, 555.123.4567.
            Pattern {
                regex: concat!(
                    r"(?:\([0-9]{3}\) ?|",
                    b!(),
                    r"[0-9]{3}[.-])[0-9]{3}[.-][0-9]{4}",
                    b!()
                ),
                validate: |t, s, e| digits(&t[s..e]) == 10 && !after_digit_dot(t, s, e),
            },
            // National numbers with a trunk 0: 020 7946 0958, 030-12345678.
            Pattern {
                regex: concat!(
                    b!(),
                    r"0[1-9][0-9]{1,4}[ -][0-9]{3,8}(?:[ -][0-9]{3,4})?",
                    b!()
                ),
                validate: |t, s, e| {
                    (10..=11).contains(&digits(&t[s..e])) && !after_digit_dot(t, s, e)
                },
            },
        ],
        Builtin::Card => &[Pattern {
            regex: concat!(b!(), r"[2-6][0-9]{3}(?:[ -]?[0-9]){9,15}", b!()),
            validate: |t, s, e| {
                let n = digits(&t[s..e]);
                (13..=19).contains(&n) && luhn(&t[s..e]) && !after_digit_dot(t, s, e)
            },
        }],
        Builtin::Iban => &[Pattern {
            regex: concat!(
                b!(),
                r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?",
                b!()
            ),
            validate: |t, s, e| iban_valid(&t[s..e]),
        }],
        Builtin::Ssn => &[Pattern {
            regex: concat!(b!(), r"[0-9]{3}-[0-9]{2}-[0-9]{4}", b!()),
            validate: |t, s, e| ssn_valid(&t[s..e]) && !after_digit_dot(t, s, e),
        }],
        Builtin::Ip => &[
            Pattern {
                regex: concat!(b!(), r"(?:[0-9]{1,3}\.){3}[0-9]{1,3}", b!()),
                validate: ipv4_valid,
            },
            Pattern {
                regex: r"(?:[0-9A-Fa-f]{1,4}:|::?)(?:[0-9A-Fa-f]{0,4}:){1,7}[0-9A-Fa-f]{0,4}",
                validate: ipv6_valid,
            },
        ],
        Builtin::Secret => &[
            // AWS access key ids.
            Pattern {
                regex: concat!(b!(), r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}", b!()),
                validate: any,
            },
            // AWS secret access keys: 40 characters of base64 named as one.
            Pattern {
                regex: r#"(?i:aws_?secret_?(?:access_?)?key)["']?\s*[:=]\s*["']?[A-Za-z0-9/+]{40}(?-u:\b)"#,
                validate: any,
            },
            // OpenAI and Anthropic keys (sk-, sk-proj-, sk-ant-...).
            Pattern {
                regex: concat!(b!(), r"sk-[A-Za-z0-9_-]{20,200}"),
                validate: any,
            },
            // GitHub tokens: classic (ghp_, gho_, ghu_, ghs_, ghr_) and fine-grained.
            Pattern {
                regex: concat!(
                    b!(),
                    r"(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,244})",
                    b!()
                ),
                validate: any,
            },
            // Slack tokens.
            Pattern {
                regex: concat!(b!(), r"xox[abprs]-[A-Za-z0-9-]{10,250}"),
                validate: any,
            },
            // JWTs: three base64url parts, the first two JSON objects (`eyJ`).
            Pattern {
                regex: r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}",
                validate: any,
            },
            // PEM private keys: the block to its END line, or to the end of its base64 when cut.
            Pattern {
                regex: r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:(?s:.)*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|(?:\s*[A-Za-z0-9+/=]{4,})*)",
                validate: any,
            },
        ],
    }
}

pub fn placeholder(builtin: Builtin) -> &'static str {
    match builtin {
        Builtin::Email => "[EMAIL]",
        Builtin::Phone => "[PHONE]",
        Builtin::Card => "[CARD]",
        Builtin::Iban => "[IBAN]",
        Builtin::Ssn => "[SSN]",
        Builtin::Ip => "[IP]",
        Builtin::Secret => "[SECRET]",
    }
}

fn digits(text: &str) -> usize {
    text.bytes().filter(u8::is_ascii_digit).count()
}

/// A match that continues a dotted number (`1.555-123-4567`, a version or a decimal) is part of
/// something else.
fn after_digit_dot(text: &str, start: usize, end: usize) -> bool {
    let before = &text.as_bytes()[..start];
    let after = &text.as_bytes()[end..];
    matches!(before, [.., b'0'..=b'9', b'.'] | [.., b'.'])
        || matches!(after, [b'.', b'0'..=b'9', ..])
}

/// The Luhn checksum of the digits of `text`.
pub fn luhn(text: &str) -> bool {
    let mut sum = 0;
    for (i, d) in text
        .bytes()
        .rev()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
        .enumerate()
    {
        sum += if i % 2 == 1 {
            let x = d * 2;
            if x > 9 { x - 9 } else { x }
        } else {
            d
        };
    }
    sum % 10 == 0
}

/// ISO 13616: length 15 to 34, and the number read with the country and check digits moved to
/// the end (letters as 10..35) is 1 mod 97.
pub fn iban_valid(text: &str) -> bool {
    let compact: Vec<u8> = text.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for &c in tail.iter().chain(head) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// US SSNs as the SSA issues them: no area 000, 666 or 9xx, no group 00, no serial 0000.
fn ssn_valid(text: &str) -> bool {
    let mut parts = text.split('-');
    let (Some(area), Some(group), Some(serial)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

/// Four octets of at most 255, not part of a longer dotted number (`1.2.3.4.5`) and not a version
/// (`v1.2.3.4`, `version 10.0.0.1`, `1.2.3.4-beta`).
fn ipv4_valid(text: &str, start: usize, end: usize) -> bool {
    let octets_ok = text[start..end]
        .split('.')
        .all(|o| o.parse::<u8>().is_ok() && (o.len() == 1 || !o.starts_with('0')));
    if !octets_ok {
        return false;
    }
    let before = &text.as_bytes()[..start];
    let after = &text.as_bytes()[end..];
    if matches!(before, [.., b'.' | b'v' | b'V' | b'-' | b'_'])
        || matches!(after, [b'.' | b'-' | b'_', b'0'..=b'9' | b'a'..=b'z', ..])
    {
        return false;
    }
    let mut from = start.saturating_sub(16);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    let lead = text[from..start].to_ascii_lowercase();
    !(lead.contains("version") || lead.contains("release"))
}

/// What `std` parses as IPv6 with at least three groups' worth of text (`::` and `a:b` are no
/// address) and not a clock time (`12:30:45`, which has no `::` and too few groups anyway).
fn ipv6_valid(text: &str, start: usize, end: usize) -> bool {
    let t = &text[start..end];
    let hex = t.bytes().filter(u8::is_ascii_hexdigit).count();
    let before = &text.as_bytes()[..start];
    let after = &text.as_bytes()[end..];
    hex >= 3
        && !matches!(before, [.., b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b':'])
        && !matches!(after, [b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b':', ..])
        && t.parse::<std::net::Ipv6Addr>().is_ok()
}

/// A byte that continues a word: a keyword match next to one is part of a longer word.
pub fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finds(builtin: Builtin, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for p in patterns(builtin) {
            let re = regex::Regex::new(p.regex).unwrap();
            for m in re.find_iter(text) {
                if (p.validate)(text, m.start(), m.end()) {
                    out.push(m.as_str().to_string());
                }
            }
        }
        out
    }

    #[test]
    fn emails() {
        assert_eq!(
            finds(
                Builtin::Email,
                "write to jane.doe+x@mail.example.co.uk today"
            ),
            ["jane.doe+x@mail.example.co.uk"]
        );
        assert!(finds(Builtin::Email, "a @ b, user@localhost, @handle, x@y.z").is_empty());
    }

    #[test]
    fn phones() {
        assert_eq!(
            finds(Builtin::Phone, "call +14155552671 now"),
            ["+14155552671"]
        );
        assert_eq!(
            finds(Builtin::Phone, "or +44 20 7946 0958."),
            ["+44 20 7946 0958"]
        );
        assert_eq!(
            finds(Builtin::Phone, "US (415) 555-2671"),
            ["(415) 555-2671"]
        );
        assert_eq!(finds(Builtin::Phone, "US 415-555-2671."), ["415-555-2671"]);
        assert_eq!(finds(Builtin::Phone, "UK 020 7946 0958"), ["020 7946 0958"]);
        for no in [
            "version 1.2.3",
            "on 2024-01-15",
            "pi 3.14159265",
            "+1 2",
            "ISBN 978-3-16-148410-0",
            "id 12345678901234",
        ] {
            assert!(finds(Builtin::Phone, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn cards_are_luhn_checked() {
        assert_eq!(
            finds(Builtin::Card, "card 4111 1111 1111 1111 exp"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            finds(Builtin::Card, "4111-1111-1111-1111"),
            ["4111-1111-1111-1111"]
        );
        assert_eq!(
            finds(Builtin::Card, "amex 378282246310005"),
            ["378282246310005"]
        );
        assert_eq!(finds(Builtin::Card, "x5555555555554444y").len(), 0);
        for no in [
            "4111 1111 1111 1112",     // fails Luhn
            "1234567812345670",        // Luhn-valid but no card prefix
            "41111111111111111111111", // too long
            "order 4111111111111112",  // fails Luhn
            "v4111111111111111.2",     // inside a dotted number
        ] {
            assert!(finds(Builtin::Card, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn ibans_are_checksum_verified() {
        assert_eq!(
            finds(Builtin::Iban, "IBAN GB82 WEST 1234 5698 7654 32 please"),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert_eq!(
            finds(Builtin::Iban, "DE89370400440532013000"),
            ["DE89370400440532013000"]
        );
        assert!(finds(Builtin::Iban, "GB82 WEST 1234 5698 7654 33").is_empty());
        assert!(finds(Builtin::Iban, "AB12 CDEF GHIJ KLMN").is_empty());
    }

    #[test]
    fn ssns() {
        assert_eq!(finds(Builtin::Ssn, "ssn 123-45-6789."), ["123-45-6789"]);
        for no in [
            "000-12-3456",
            "666-12-3456",
            "912-34-5678",
            "123-00-4567",
            "123-45-0000",
            "1123-45-6789",
        ] {
            assert!(finds(Builtin::Ssn, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn ips_but_not_versions() {
        assert_eq!(finds(Builtin::Ip, "host 10.0.12.7 down"), ["10.0.12.7"]);
        assert_eq!(
            finds(Builtin::Ip, "at 2001:db8::8a2e:370:7334 ok"),
            ["2001:db8::8a2e:370:7334"]
        );
        assert_eq!(finds(Builtin::Ip, "fe80::1"), ["fe80::1"]);
        for no in [
            "v1.2.3.4",
            "version 10.0.0.1",
            "1.2.3.4.5",
            "1.2.3.4-beta",
            "999.1.1.1",
            "at 12:30:45",
            "std::vec",
            "a::b",
            "1.02.3.4",
        ] {
            assert!(finds(Builtin::Ip, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn secrets() {
        let yes = [
            "AKIAIOSFODNN7EXAMPLE",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
            "xoxb-123456789012-abcdefghijkl",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
            "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        ];
        for s in yes {
            let text = format!("here: {s} end");
            assert_eq!(finds(Builtin::Secret, &text), [s], "{s}");
        }
        for no in [
            "AKIA1234",
            "task-abcdefghijklmnopqrstuvwxyz",
            "sk-short",
            "ghp_short",
            "eyJhbGciOiJIUzI1NiJ9 alone",
            "-----BEGIN PUBLIC KEY-----\nMIIB",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ] {
            assert!(finds(Builtin::Secret, no).is_empty(), "{no}");
        }
    }
}
