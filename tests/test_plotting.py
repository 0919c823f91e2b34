"""Plot helpers (lmbook.core.plotting)."""



from lmbook.core.plotting import model_color


def test_model_colors_are_stable():
    assert model_color("gemma-3-270m") != model_color("smollm2-135m-instruct")
    assert model_color("org/x") == model_color("org/x")
