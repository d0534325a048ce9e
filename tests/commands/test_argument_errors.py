"""jsonargparse's type errors condensed to one line: the innermost field, the value given there and the types
it takes; other messages are left whole."""

from __future__ import annotations

from distilkit.commands.argument_errors import one_line

LIST_IN_A_CLASS = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'distilkit.data.text.TextDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'distilkit.TextDataModule':
        Parser key "val_files":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'str'>, list[str], <class 'NoneType'>]
          Errors:
            - Expected a <class 'str'>
            - Expected a <class 'str'>. Got value: 1
            - Expected a <class 'NoneType'>
          Given value type: <class 'list'>
          Given value: [1, {}]
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='val_files', val=[1, {}])"""

UNKNOWN_OPTION = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'distilkit.DistillationModule':
        Option 'kd_ratoi' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='kd_ratoi', val='0.3')"""


def test_a_union_names_the_whole_value_and_every_type_but_none():
    error = one_line(LIST_IN_A_CLASS)
    assert str(error) == "data.val_files='[1, {}]': is not a str or a list[str]; give a str or a list[str]."


def test_one_type_and_a_literal():
    error = one_line("Parser key \"trainer.max_steps\":\n  Expected a <class 'int'>. Got value: abc")
    assert str(error) == "trainer.max_steps='abc': is not an int; give an int."
    literal = "Parser key \"mix_by\":\n  Expected a typing.Literal['weights', 'posterior']. Got value: bayes"
    assert "is not one of 'weights', 'posterior'" in str(one_line(literal))


def test_a_flow_mapping_without_spaces_gets_a_hint():
    mix = 'Parser key "mix":\n  Expected a dict[str, float]. Got value: {a:0.5,b:0.5}'
    assert str(one_line(mix)).endswith("give a dict[str, float] (YAML reads {a: 1} as a mapping only with a "
                                       "space after each colon).")  # fmt: skip


def test_other_messages_are_shown_whole():
    assert one_line(UNKNOWN_OPTION) is None
    assert one_line("unrecognized arguments: --bogus 1") is None
