from .model import LVM, LVMTraining, LVMTraining_CP
from .processor import LVMProcessor
from .scheduler import LVMScheduler
from .pipeline import LVMPipeline