"""Reading chapter 4's word lists and neutral text (lmbook.data.word_lists)."""


import pytest

from lmbook.core.params import ParameterError
from lmbook.data.word_lists import load_word_lists

from conftest import one_line


@pytest.mark.parametrize("text,match", [
    ('{"positive": [" love"],\n "negative": [,]}', "WORD_LISTS .*line 2: not valid JSON"),
    ('[" love"]', "expected a JSON object"),
    ('{"positive": [" love"], "negative": [" hate"]}', "under 'weddings', got nothing"),
    ('{"positive": " love", "negative": [" hate"], "weddings": ["bride"]}', "under 'positive', got str"),
    ('{"positive": [" love", ""], "negative": [" hate"], "weddings": ["bride"]}',
     r"positive\[1\] must be a non-empty string"),
])
def test_word_lists(tmp_path, text, match):
    f = tmp_path / "w.json"
    f.write_text(text)
    with pytest.raises(ParameterError, match=match) as e:
        load_word_lists(f)
    one_line(e)
