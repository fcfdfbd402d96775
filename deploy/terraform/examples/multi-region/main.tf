# The guide's §3.2 layout, corrected: the primary region holds the source
# database; each standby region runs one node (one shared slot on the
# source) applying its tenants to that region's database. The VPCs, their
# peering and the databases are yours (referenced by id here).
#
#   terraform init && terraform plan -out=plan && terraform apply plan
terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
  # backend "s3" { … }: keep the state remote and encrypted; it holds no
  # password (connections live in Secrets Manager).
}

provider "aws" {
  alias  = "eu"
  region = "eu-west-1"
}

provider "aws" {
  alias  = "ap"
  region = "ap-south-1"
}

variable "release" {
  description = "The binary's URL and SHA-256 (both regions run the same)."
  type = object({
    url    = string
    sha256 = string
  })
}

variable "regions" {
  description = "Per standby region: network ids, its Debian 12 AMI, the connections secret (in that region), database CIDRs (the source's in the primary region, and the local target's), and the tenants placed there."
  type = map(object({
    vpc_id                 = string
    subnet_id              = string
    ami_id                 = string
    connections_secret_arn = string
    database_cidrs         = list(string)
    https_egress_cidrs     = list(string)
    monitoring_cidrs       = list(string)
    tenants                = list(string)
  }))
}

module "eu_west_1" {
  source    = "../../aws"
  providers = { aws = aws.eu }

  name                   = "heliosdb-eu-west-1"
  vpc_id                 = var.regions["eu-west-1"].vpc_id
  subnet_id              = var.regions["eu-west-1"].subnet_id
  ami_id                 = var.regions["eu-west-1"].ami_id
  connections_secret_arn = var.regions["eu-west-1"].connections_secret_arn
  database_cidrs         = var.regions["eu-west-1"].database_cidrs
  https_egress_cidrs     = var.regions["eu-west-1"].https_egress_cidrs
  monitoring_cidrs       = var.regions["eu-west-1"].monitoring_cidrs
  node = {
    tenants = [for t in var.regions["eu-west-1"].tenants : { tenant_id = t }]
    settings = {
      cdc = { replication_slot = "region_eu_west_1_slot", publication_name = "region_eu_west_1_pub" }
    }
    binary_url    = var.release.url
    binary_sha256 = var.release.sha256
  }
  tags = { Environment = "production", Region = "eu-west-1" }
}

module "ap_south_1" {
  source    = "../../aws"
  providers = { aws = aws.ap }

  name                   = "heliosdb-ap-south-1"
  vpc_id                 = var.regions["ap-south-1"].vpc_id
  subnet_id              = var.regions["ap-south-1"].subnet_id
  ami_id                 = var.regions["ap-south-1"].ami_id
  connections_secret_arn = var.regions["ap-south-1"].connections_secret_arn
  database_cidrs         = var.regions["ap-south-1"].database_cidrs
  https_egress_cidrs     = var.regions["ap-south-1"].https_egress_cidrs
  monitoring_cidrs       = var.regions["ap-south-1"].monitoring_cidrs
  node = {
    tenants = [for t in var.regions["ap-south-1"].tenants : { tenant_id = t }]
    settings = {
      cdc = { replication_slot = "region_ap_south_1_slot", publication_name = "region_ap_south_1_pub" }
    }
    binary_url    = var.release.url
    binary_sha256 = var.release.sha256
  }
  tags = { Environment = "production", Region = "ap-south-1" }
}

output "nodes" {
  value = {
    "eu-west-1"  = { instance = module.eu_west_1.instance_id, health = module.eu_west_1.health_url }
    "ap-south-1" = { instance = module.ap_south_1.instance_id, health = module.ap_south_1.health_url }
  }
}
