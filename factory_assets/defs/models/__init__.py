from factory_assets.defs.models.assets import model_endpoint, stock_model

assets = [stock_model, model_endpoint]
