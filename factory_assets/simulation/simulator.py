"""Former home of the simulated factory, kept for the callers not moved yet: the pure
simulation is :mod:`factory_assets.simulation.factory`, its MQTT publishing
:mod:`factory_assets.simulation.publisher`. New code imports from those."""
from factory_assets.simulation.factory import (BME680_TOPIC, FILL_CYCLE, LDR_TOPIC, FactorySimulator,  # noqa: F401
                                               StockChange, iso_ms)
from factory_assets.simulation.publisher import SimulationResult, run_in_background, run_simulation  # noqa: F401
