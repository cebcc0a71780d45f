//! relora-analysis: what turns finished runs into results.
//!
//! Singular-value spectra of weight updates (faer, in f64), the paper-shaped tables of
//! perplexities with intervals of their differences (`stats`), and the figures (plotters, PNG and SVG with an embedded DejaVu Sans font so
//! that text renders on machines without fonts). It works on plain numbers: no candle, no
//! pipelines.

pub mod differences;
pub mod plots;
pub mod report;
pub mod spectrum;
pub mod stats;

pub use spectrum::{analyse, singular_values, SpectrumReport};
