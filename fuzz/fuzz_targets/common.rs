//! Splits a fuzz input into headers and a body: the input is `name: value` lines, then an
//! empty line (`\n\n`), then the body. Inputs without the separator are all body, with the
//! fallback headers given by the target.

use http::{HeaderMap, HeaderName, HeaderValue};

pub fn split<'a>(
    data: &'a [u8],
    fallback: &[(&'static str, &'static str)],
) -> (HeaderMap, &'a [u8]) {
    let mut headers = HeaderMap::new();
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => {
            for (k, v) in fallback {
                headers.insert(
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).expect("static header"),
                );
            }
            return (headers, data);
        }
    };
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    (headers, body)
}
