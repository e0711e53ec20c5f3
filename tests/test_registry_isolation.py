"""The registry fixture: what a test registers leaves with the test, the rest stays as it was."""

from conftest import registry_restored

from harness.registry import Method, available_methods, register_method


def test_registered_methods_leave_with_the_block():
    before = available_methods()

    with registry_restored():
        @register_method
        class Temporary(Method):
            name = "temporary-isolation-test"

            def quantize(self, lm, qcfg, calib):
                raise NotImplementedError

        assert available_methods()["temporary-isolation-test"] is Temporary
    after = available_methods()
    assert "temporary-isolation-test" not in after
    assert after == before and "rtn" in after  # in-tree methods kept, same classes
