"""Receipt lines as a customer sees them printed, one test per kind."""

from txengine.models import ReceiptLine


def test_a_name_value_line_keeps_name_and_value_apart_with_the_value_right_aligned():
    printed = ReceiptLine("name-value", name="Paid with points/credit", value="4.50 EUR").render(40)
    assert printed == "Paid with points/credit" + " " * 9 + "4.50 EUR"
    assert len(printed) == 40


def test_a_name_value_line_too_long_for_the_width_still_has_a_space_between():
    printed = ReceiptLine("name-value", name="Points left", value="1500").render(12)
    assert printed == "Points left 1500"


def test_a_separator_centres_its_caption_in_dashes():
    assert ReceiptLine("separator", text="Loyalty").render(20) == "----- Loyalty ------"
    assert ReceiptLine("separator").render(5) == "-----"


def test_a_space_is_an_empty_line_and_a_textline_is_its_text():
    assert ReceiptLine("space").render() == ""
    assert ReceiptLine("textline", text="Thank you").render() == "Thank you"


def test_an_important_textline_is_printed_in_capitals():
    assert ReceiptLine("textline", text="Card 4711", decoration=("important",)).render() == "CARD 4711"
