"""From probabilities to answers: metrics, decoding labels (`labels`), threshold search
(`thresholds`), the rule chosen for a run (`rules`), blending several runs (`ensemble`) and the
reports on labels and errors (`reports`). Pure numpy/pandas; imports from `core` and `data`."""
